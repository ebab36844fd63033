"""Config values that cannot work are refused when the config is loaded, naming the key."""

import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from di_maskdino.d2 import ConfigError, load_config  # noqa: E402
from tests.tooling import QUICK, ROOT  # noqa: E402


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["MODEL.DI_MASKDINO.NUM_CLASSES", "0"], "MODEL.DI_MASKDINO.NUM_CLASSES = 0: must be at least 1"),
        (["TEST.DETECTIONS_PER_IMAGE", "0"], "TEST.DETECTIONS_PER_IMAGE = 0: must be at least 1"),
        (
            ["MODEL.DI_MASKDINO.HIDDEN_DIM", "60", "MODEL.DI_MASKDINO.MASK_DIM", "60"],
            "MODEL.DI_MASKDINO.HIDDEN_DIM = 60: must be divisible by MODEL.DI_MASKDINO.NUM_HEADS (8)",
        ),
        (
            ["MODEL.DI_MASKDINO.NUM_OBJECT_QUERIES", "200"],
            "MODEL.DI_MASKDINO.DE_IMBALANCE.SELECTION_SIZES = [600, 300]",
        ),
        (["MODEL.DI_MASKDINO.DEC_LAYERS", "0"], "MODEL.DI_MASKDINO.DEC_LAYERS = 0"),
        (["MODEL.DI_MASKDINO.DROPOUT", "1.0"], "MODEL.DI_MASKDINO.DROPOUT = 1.0: must be in [0, 1)"),
        (["MODEL.DI_MASKDINO.BATO.GUIDANCE_SOURCE", "T_x"], "MODEL.DI_MASKDINO.BATO.GUIDANCE_SOURCE = 'T_x'"),
        (["MODEL.DI_MASKDINO.NUM_FEATURE_LEVELS", "2"], "MODEL.DI_MASKDINO.NUM_FEATURE_LEVELS = 2"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH = 0"),
        (["SOLVER.BASE_LR", "0.0"], "SOLVER.BASE_LR = 0.0: must be positive"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD = 0"),
        (
            ["INPUT.DATASET_MAPPER_NAME", "crop"],
            "INPUT.DATASET_MAPPER_NAME = 'crop': must be one of lsj, resize, panoptic_lsj, semantic",
        ),
        (["MODEL.DI_MASKDINO.LOSS.IMPORTANCE_SAMPLE_RATIO", "1.5"], "IMPORTANCE_SAMPLE_RATIO = 1.5"),
        (
            ["MODEL.DI_MASKDINO.BATO.GUIDANCE_SOURCE", "T_s2", "MODEL.DI_MASKDINO.DE_IMBALANCE.ENABLED", "False"],
            "MODEL.DI_MASKDINO.BATO.GUIDANCE_SOURCE = 'T_s2': must be other than T_s2 without the De-Imbalance",
        ),
        (
            ["MODEL.MASK_ON", "False"],
            "MODEL.DI_MASKDINO.MASK_ENHANCED_BOXES = True: must be False in a detection-only model (MODEL.MASK_ON "
            "False)",
        ),
        (["MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS", "all"], "TEST_MASKS = 'all': must be one of refined,"),
        (
            ["MODEL.DI_MASKDINO.TEST.INSTANCE_ON", "False"],
            "MODEL.DI_MASKDINO.TEST.INSTANCE_ON = False: must be True unless",
        ),
        (["MODEL.DI_MASKDINO.TEST.TEMPERATURE", "-1.0"], "MODEL.DI_MASKDINO.TEST.TEMPERATURE = -1.0: must be at"),
        (
            ["MODEL.DI_MASKDINO.MASK_BOX_EDGES", "bitmask"],
            'MODEL.DI_MASKDINO.MASK_BOX_EDGES = \'bitmask\': must be "indices" or "pixels"',
        ),
    ],
)
def test_impossible_values_are_refused_by_key(overrides, named):
    config = os.path.join(ROOT, "configs", "coco", "dimaskdino_r50_12ep.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(config, overrides)
    assert named in str(error.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(QUICK, ["MODEL.DI_MASKDINO.NUM_CLASSES", "0", "TEST.DETECTIONS_PER_IMAGE", "0"])
    assert "NUM_CLASSES" in str(error.value) and "DETECTIONS_PER_IMAGE" in str(error.value)


def test_every_shipped_config_is_valid():
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in files:
            if name.endswith(".yaml"):
                load_config(os.path.join(folder, name))


def test_a_missing_config_file_is_named():
    with pytest.raises(FileNotFoundError, match="config file nowhere.yaml does not exist"):
        load_config("nowhere.yaml")

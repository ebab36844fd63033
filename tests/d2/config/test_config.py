"""Configuration: every declared key is read by the code that builds the model, data and
optimizer; configs round-trip through YAML."""

import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.config import CfgNode, get_cfg  # noqa: E402

from di_maskdino.d2 import (  # noqa: E402
    Checkpointer,
    ConfigArgumentParser,
    DIMaskDINOArch,
    add_di_maskdino_config,
    build_optimizer,
)
from di_maskdino.d2.config import objective_from_config  # noqa: E402
from di_maskdino.d2.data import DIMaskDINODatasetMapper, PanopticDatasetMapper, SemanticDatasetMapper  # noqa: E402
from di_maskdino.d2.data.datasets import register_config_datasets  # noqa: E402
from di_maskdino.d2.engine.ema import build_ema  # noqa: E402
from di_maskdino.d2.engine.trainer import (  # noqa: E402
    build_periodic_checkpointer,
    evaluation_precision,
    micro_batch_size,
    weights_load_mode,
)
from tests.tooling import ROOT  # noqa: E402


class TrackedCfg(CfgNode):
    """A CfgNode that records the full name of every key read through attribute access."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        self.__dict__["_reads"].add(self.__dict__["_path"] + name)
        return value


def tracked(node, reads, path=""):
    copy = TrackedCfg()
    copy.__dict__["_reads"] = reads
    copy.__dict__["_path"] = path
    for key, value in node.items():
        dict.__setitem__(copy, key, tracked(value, reads, f"{path}{key}.") if isinstance(value, CfgNode) else value)
    return copy


def leaves(node, path=""):
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from leaves(value, f"{path}{key}.")
        else:
            yield path + key


def declared_keys():
    """Keys that add_di_maskdino_config adds to detectron2's defaults."""
    base = set(leaves(get_cfg()))
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    return cfg, set(leaves(cfg)) - base


def test_every_declared_key_is_read():
    cfg, declared = declared_keys()
    reads = set()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DI_MASKDINO.ENCODER.NUM_LAYERS = 1  # keep the build quick; the key is still read
    cfg.MODEL.DI_MASKDINO.DEC_LAYERS = 2
    view = tracked(cfg, reads)
    model = DIMaskDINOArch(view)
    DIMaskDINODatasetMapper(view, True)
    DIMaskDINODatasetMapper(view, False)
    PanopticDatasetMapper(view, True)  # panoptic / semantic recipes
    SemanticDatasetMapper(view, True)
    build_optimizer(view, model)
    weights_load_mode(view, resuming=False)
    build_periodic_checkpointer(view, Checkpointer(model))
    evaluation_precision(view)
    register_config_datasets(view.DATASETS.COCO_FORMAT)
    micro_batch_size(view, 1)
    ema_cfg = cfg.clone()
    ema_cfg.MODEL_EMA.ENABLED = True  # the EMA's settings are read when it is on
    build_ema(tracked(ema_cfg, reads), torch.nn.Linear(1, 1))
    Checkpointer.for_evaluation(model, tracked(ema_cfg, reads))
    head_cfg = cfg.clone()
    head_cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD.ENABLED = True  # the head's losses are read when it is on
    objective_from_config(tracked(head_cfg, reads))
    timm_cfg = cfg.clone()
    timm_cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
    timm_cfg.MODEL.TIMM.NAME = "resnet18"
    from detectron2.modeling import build_backbone

    build_backbone(tracked(timm_cfg, reads))
    vit_cfg = cfg.clone()  # the ViT backbone's keys (a small timm ViT, random weights)
    vit_cfg.MODEL.BACKBONE.NAME = "build_vit_backbone"
    vit_cfg.MODEL.VIT.NAME = "test_vit"
    vit_cfg.MODEL.DI_MASKDINO.ENCODER.IN_FEATURES = ["p3", "p4", "p5"]
    vit_cfg.SOLVER.LAYER_DECAY = 0.8  # read by the optimizer of a model with a ViT backbone
    vit_view = tracked(vit_cfg, reads)
    build_optimizer(vit_view, DIMaskDINOArch(vit_view))
    unread = sorted(declared - reads)
    assert unread == [], f"declared but never read: {unread}"


def value_of(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_yaml_round_trip(tmp_path):
    cfg, declared = declared_keys()
    cfg.MODEL.DI_MASKDINO.DE_IMBALANCE.SELECTION_SIZES = [900, 600, 300]
    cfg.MODEL.DI_MASKDINO.BATO.GUIDANCE_SOURCE = "T_s1"
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    again = get_cfg()
    add_di_maskdino_config(again)
    again.merge_from_file(str(path))
    for key in declared:
        assert value_of(again, key) == value_of(cfg, key), key
    assert again.MODEL.DI_MASKDINO.DE_IMBALANCE.SELECTION_SIZES == [900, 600, 300]


def shipped_configs():
    configs = []
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        configs += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(".yaml")]
    return sorted(configs)


@pytest.mark.parametrize("path", shipped_configs())
def test_every_shipped_config_builds_its_model(path):
    from detectron2.modeling import build_model

    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, path))
    # on the meta device: the structure is built, no memory is filled (Swin-L has 200 M parameters)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    head = model.head
    m = cfg.MODEL.DI_MASKDINO
    assert len(head.decoder.layers) == m.DEC_LAYERS
    assert (head.de_imbalance is not None) == m.DE_IMBALANCE.ENABLED
    assert (head.bato is not None) == m.BATO.ENABLED
    assert head.heads.class_embed.out_features == m.NUM_CLASSES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_cuda_configs_run_on_the_cpu_of_a_machine_without_cuda():
    from di_maskdino.d2 import load_config, use_available_device

    cfg = load_config(os.path.join(ROOT, "configs", "coco", "dimaskdino_r50_12ep.yaml"))
    assert cfg.MODEL.DEVICE == "cuda"  # detectron2's default
    assert use_available_device(cfg) == "CUDA is not available: running on the CPU (MODEL.DEVICE cuda -> cpu)"
    assert cfg.MODEL.DEVICE == "cpu"
    assert use_available_device(cfg) == ""  # nothing more to say


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning concerns machines without CUDA")
def test_loading_a_config_keeps_the_cuda_home_warning_away():
    """torch's extension helper warns at import, on a machine with a CUDA toolkit but no
    CUDA runtime, about building CUDA code; every tool loads a config first, which imports the
    helper quietly (in a fresh process, where it is not imported yet)."""
    import subprocess
    import sys

    def stderr(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stderr

    bare = stderr("import torch.utils.cpp_extension")
    if "No CUDA runtime is found" not in bare:
        pytest.skip("no CUDA toolkit here: torch's extension helper has nothing to warn about")
    quiet = stderr(
        "from di_maskdino.d2 import load_config; load_config('configs/quick_start.yaml'); "
        "import torch.utils.cpp_extension"
    )
    assert "No CUDA runtime is found" not in quiet, quiet[-2000:]


def test_command_line_overrides_are_not_taken_by_a_many_valued_option():
    parser = ConfigArgumentParser()
    parser.add_argument("--backend", nargs="+", default=["eager"])
    parser.add_argument("--input", nargs="+")
    parser.add_argument("--json")

    args = parser.parse_args(["--backend", "eager", "compile", "MODEL.WEIGHTS", "", "OUTPUT_DIR", "out"])
    assert args.backend == ["eager", "compile"]
    assert args.opts == ["MODEL.WEIGHTS", "", "OUTPUT_DIR", "out"]
    # file names that merely look like keys stay values: no such config value, or the value
    # of a one-value option
    args = parser.parse_args(["--input", "IMG.JPG", "INPUT.JPG", "MODEL.jpg", "SOLVER", "--json", "SEED"])
    assert args.input == ["IMG.JPG", "INPUT.JPG", "MODEL.jpg", "SOLVER"] and args.json == "SEED"
    assert args.opts == []
    # what argparse alone accepts is unchanged
    args = parser.parse_args(["MODEL.DEVICE", "cpu"])
    assert args.backend == ["eager"] and args.opts == ["MODEL.DEVICE", "cpu"]

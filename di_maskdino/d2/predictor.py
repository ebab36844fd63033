"""`Predictor` built from a detectron2 configuration."""

from typing import Optional, Sequence, Union

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..predictor import Predictor
from .checkpoint import Checkpointer
from .config import load_config
from .panoptic import class_names

__all__ = ["predictor_from_config"]


def predictor_from_config(
    config: Union[str, CfgNode],
    weights: Optional[str] = None,
    opts: Sequence[str] = (),
    *,
    allow_random_weights: bool = False,
    **kwargs,
) -> Predictor:
    """A `Predictor` of the model a config file (or a loaded config) describes.

    weights: a checkpoint (default MODEL.WEIGHTS; converted release checkpoints only).
    opts: KEY VALUE overrides of the config.
    allow_random_weights: without weights (none given, MODEL.WEIGHTS empty), run the
        untrained model instead of raising.
    kwargs: `Predictor` arguments; by default the input format is INPUT.FORMAT for the
        network and RGB for arrays, the resizing INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, the
        device MODEL.DEVICE, at most TEST.DETECTIONS_PER_IMAGE instances per image, and the
        class names those of the config's dataset (`panoptic.class_names`: every class of a
        panoptic / semantic model, whose labels index things and stuff).

    The instances are those of the detectron2 model's inference (see `Predictor.from_model`):
    a box mask head's refined masks unless MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS is
    "detector" ("both": the refined ones), the things of a panoptic model.
    """
    cfg = load_config(config, opts) if isinstance(config, str) else config.clone()
    if not isinstance(config, str) and opts:
        cfg.merge_from_list(list(opts))
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if not weights and not allow_random_weights:
        raise ValueError(
            "predictor_from_config: no weights (MODEL.WEIGHTS is empty and none were given): the predictor would "
            "run an untrained (random) model. Give weights=PATH, or allow_random_weights=True on purpose"
        )
    model = build_model(cfg).eval()
    if weights:
        Checkpointer(model, mode="strict", what="weights").load(weights)
    settings = dict(
        model_format=cfg.INPUT.FORMAT,
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
        class_names=class_names(cfg),
    )
    settings.update(kwargs)
    return Predictor.from_model(model, **settings)

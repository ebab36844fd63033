"""The config as the core's descriptions: `architecture_from_config` (the network,
`Architecture`) and `objective_from_config` (its losses, `Objective`).

`ARCHITECTURE_KEYS` and `OBJECTIVE_KEYS` name the config key of every field; the readers
below read each field through them, and `validation.py` names the keys of the fields whose
values cannot work (the specs say which, all at once).
"""

from typing import Any, Callable, Dict

from detectron2.config import CfgNode

from ...modeling import (
    ActivationCheckpointing,
    Architecture,
    BATOSpec,
    BoxMaskHeadSpec,
    BoxMaskObjective,
    DeImbalanceSpec,
    DenoisingSpec,
    EncoderSpec,
    MatchingCosts,
    Objective,
)

__all__ = ["architecture_from_config", "objective_from_config", "ARCHITECTURE_KEYS", "OBJECTIVE_KEYS", "config_value"]

_M = "MODEL.DI_MASKDINO."

# field of `Architecture` (nested as "encoder.num_layers") -> config key
ARCHITECTURE_KEYS: Dict[str, str] = {
    "num_classes": _M + "NUM_CLASSES",
    "hidden_dim": _M + "HIDDEN_DIM",
    "mask_dim": _M + "MASK_DIM",
    "num_heads": _M + "NUM_HEADS",
    "ffn_dim": _M + "DIM_FEEDFORWARD",
    "dropout": _M + "DROPOUT",
    "num_levels": _M + "NUM_FEATURE_LEVELS",
    "num_points": _M + "DEC_N_POINTS",
    "num_queries": _M + "NUM_OBJECT_QUERIES",
    "num_decoder_layers": _M + "DEC_LAYERS",
    "mask_enhanced_boxes": _M + "MASK_ENHANCED_BOXES",
    "mask_box_edges": _M + "MASK_BOX_EDGES",
    "padding_mask": _M + "PADDING_MASK",
    "num_groups": _M + "ENCODER.NUM_GROUPS",
    "encoder.in_features": _M + "ENCODER.IN_FEATURES",
    "encoder.num_layers": _M + "ENCODER.NUM_LAYERS",
    "encoder.ffn_dim": _M + "ENCODER.DIM_FEEDFORWARD",
    "encoder.num_points": _M + "ENCODER.N_POINTS",
    "encoder.common_stride": _M + "ENCODER.COMMON_STRIDE",
    "de_imbalance.selection_sizes": _M + "DE_IMBALANCE.SELECTION_SIZES",
    "de_imbalance.token_interaction_layers": _M + "DE_IMBALANCE.TI_LAYERS",
    "bato.guidance_source": _M + "BATO.GUIDANCE_SOURCE",
    "bato.generate_guiding_tokens": _M + "BATO.GENERATE_GUIDING_TOKENS",
    "bato.num_guiding_tokens": _M + "BATO.NUM_GUIDING_TOKENS",
    "denoising.num_queries": _M + "DN.NUM_QUERIES",
    "denoising.noise_scale": _M + "DN.NOISE_SCALE",
    "random_position_token": _M + "TOLERANCE.RANDOM_POSITION_TOKEN",
    "checkpointing.backbone": _M + "ACTIVATION_CHECKPOINTING.BACKBONE",
    "checkpointing.encoder": _M + "ACTIVATION_CHECKPOINTING.ENCODER",
    "checkpointing.token_interaction": _M + "ACTIVATION_CHECKPOINTING.TOKEN_INTERACTION",
    "checkpointing.decoder": _M + "ACTIVATION_CHECKPOINTING.DECODER",
    "mask_branch": "MODEL.MASK_ON",
    "box_mask_head.hidden_dim": _M + "BOX_MASK_HEAD.HIDDEN_DIM",
    "box_mask_head.roi_size": _M + "BOX_MASK_HEAD.ROI_SIZE",
    "box_mask_head.mask_size": _M + "BOX_MASK_HEAD.MASK_SIZE",
    "box_mask_head.image_encoder_layers": _M + "BOX_MASK_HEAD.IMAGE_ENCODER_LAYERS",
    "box_mask_head.box_encoder_layers": _M + "BOX_MASK_HEAD.BOX_ENCODER_LAYERS",
    "box_mask_head.fine_feature": _M + "BOX_MASK_HEAD.FINE_FEATURE",
    "box_mask_head.mask_prior": _M + "BOX_MASK_HEAD.MASK_PRIOR",
    "box_mask_head.box_expansion": _M + "BOX_MASK_HEAD.BOX_EXPANSION",
    "box_mask_head.mask_quality": _M + "BOX_MASK_HEAD.MASK_QUALITY",
}

# field of `Objective` -> config key
OBJECTIVE_KEYS: Dict[str, str] = {
    "class_weight": _M + "LOSS.CLASS_WEIGHT",
    "box_weight": _M + "LOSS.BOX_WEIGHT",
    "giou_weight": _M + "LOSS.GIOU_WEIGHT",
    "mask_weight": _M + "LOSS.MASK_WEIGHT",
    "dice_weight": _M + "LOSS.DICE_WEIGHT",
    "focal_alpha": _M + "LOSS.FOCAL_ALPHA",
    "focal_gamma": _M + "LOSS.FOCAL_GAMMA",
    "num_points": _M + "LOSS.TRAIN_NUM_POINTS",
    "oversample_ratio": _M + "LOSS.OVERSAMPLE_RATIO",
    "importance_sample_ratio": _M + "LOSS.IMPORTANCE_SAMPLE_RATIO",
    "detection_loss_factor": _M + "TOLERANCE.DETECTION_LOSS_FACTOR",
    "stuff_box_loss": _M + "LOSS.STUFF_BOX_LOSS",
    "matching.class_weight": _M + "MATCHER.CLASS_WEIGHT",
    "matching.box_weight": _M + "MATCHER.BOX_WEIGHT",
    "matching.giou_weight": _M + "MATCHER.GIOU_WEIGHT",
    "matching.mask_weight": _M + "MATCHER.MASK_WEIGHT",
    "matching.dice_weight": _M + "MATCHER.DICE_WEIGHT",
    "box_mask_head.mask_weight": _M + "BOX_MASK_HEAD.MASK_WEIGHT",
    "box_mask_head.dice_weight": _M + "BOX_MASK_HEAD.DICE_WEIGHT",
    "box_mask_head.quality_weight": _M + "BOX_MASK_HEAD.QUALITY_WEIGHT",
    "box_mask_head.num_points": _M + "BOX_MASK_HEAD.NUM_POINTS",
}


def config_value(cfg: CfgNode, key: str) -> Any:
    """The value of a dotted key ("MODEL.DI_MASKDINO.HIDDEN_DIM")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _reader(cfg: CfgNode, keys: Dict[str, str]) -> Callable[[str], Any]:
    def value(field: str) -> Any:
        found = config_value(cfg, keys[field])
        return tuple(found) if isinstance(found, list) else found

    return value


def _group(value: Callable[[str], Any], keys: Dict[str, str], prefix: str) -> Dict[str, Any]:
    """The fields under `prefix.` as keyword arguments of their spec."""
    return {name[len(prefix) + 1 :]: value(name) for name in keys if name.startswith(prefix + ".")}


def architecture_from_config(cfg: CfgNode) -> Architecture:
    """The network MODEL.DI_MASKDINO describes (its sizes, and which optional parts are on:
    DE_IMBALANCE.ENABLED, BATO.ENABLED, DN.ENABLED, BOX_MASK_HEAD.ENABLED). Raises
    `SpecError` listing every field whose value cannot work (see `validation.py` for the
    message with the config keys)."""
    m = cfg.MODEL.DI_MASKDINO
    value = _reader(cfg, ARCHITECTURE_KEYS)
    top = {name: value(name) for name in ARCHITECTURE_KEYS if "." not in name}
    box_mask_head = _group(value, ARCHITECTURE_KEYS, "box_mask_head")
    box_mask_head["fine_feature"] = box_mask_head["fine_feature"] or None  # "" in the config: none
    return Architecture(
        **top,
        encoder=EncoderSpec(**_group(value, ARCHITECTURE_KEYS, "encoder")),
        de_imbalance=DeImbalanceSpec(**_group(value, ARCHITECTURE_KEYS, "de_imbalance"))
        if m.DE_IMBALANCE.ENABLED
        else None,
        bato=BATOSpec(**_group(value, ARCHITECTURE_KEYS, "bato")) if m.BATO.ENABLED else None,
        denoising=DenoisingSpec(**_group(value, ARCHITECTURE_KEYS, "denoising")) if m.DN.ENABLED else None,
        checkpointing=ActivationCheckpointing(**_group(value, ARCHITECTURE_KEYS, "checkpointing")),
        box_mask_head=BoxMaskHeadSpec(**box_mask_head) if m.BOX_MASK_HEAD.ENABLED else None,
    )


def objective_from_config(cfg: CfgNode) -> Objective:
    """The losses MODEL.DI_MASKDINO.{LOSS, MATCHER, TOLERANCE} (and, with the box mask head,
    BOX_MASK_HEAD) describe."""
    value = _reader(cfg, OBJECTIVE_KEYS)
    top = {name: value(name) for name in OBJECTIVE_KEYS if "." not in name}
    head = cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD.ENABLED
    return Objective(
        **top,
        matching=MatchingCosts(**_group(value, OBJECTIVE_KEYS, "matching")),
        box_mask_head=BoxMaskObjective(**_group(value, OBJECTIVE_KEYS, "box_mask_head")) if head else None,
    )

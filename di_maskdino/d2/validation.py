"""Checks of a loaded configuration: values that cannot work are refused when the config is
loaded, with the key, the value and what it must be - not later, inside a module's
constructor or after hours of training.

`validate_config(cfg)` raises `ConfigError` listing every offending key.
"""

from typing import Callable, List, Tuple

__all__ = ["ConfigError", "validate_config"]

GUIDANCE_SOURCES = ("T_i", "T_s1", "T_s2", "Q_bal")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key(s)."""


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _rules(cfg) -> List[Tuple[str, Callable[[object], bool], str]]:
    """(key, predicate of its value, what the value must be)."""
    m = "MODEL.DI_MASKDINO."
    d = cfg.MODEL.DI_MASKDINO

    def positive(v):
        return v >= 1

    rules = [
        (m + "NUM_CLASSES", positive, "at least 1 (the number of categories of the dataset)"),
        (m + "HIDDEN_DIM", positive, "at least 1"),
        (m + "NUM_HEADS", positive, "at least 1"),
        (
            m + "HIDDEN_DIM",
            lambda v: d.NUM_HEADS < 1 or v % d.NUM_HEADS == 0,
            f"divisible by MODEL.DI_MASKDINO.NUM_HEADS ({d.NUM_HEADS})",
        ),
        (
            m + "HIDDEN_DIM",
            lambda v: d.ENCODER.NUM_GROUPS < 1 or v % d.ENCODER.NUM_GROUPS == 0,
            f"divisible by MODEL.DI_MASKDINO.ENCODER.NUM_GROUPS ({d.ENCODER.NUM_GROUPS}, GroupNorm groups)",
        ),
        (m + "ENCODER.NUM_GROUPS", positive, "at least 1"),
        (m + "MASK_DIM", positive, "at least 1"),
        (
            m + "MASK_DIM",
            lambda v: not d.BATO.ENABLED or not d.BATO.GENERATE_GUIDING_TOKENS or v == d.HIDDEN_DIM,
            f"equal to MODEL.DI_MASKDINO.HIDDEN_DIM ({d.HIDDEN_DIM}) when BATO generates guiding tokens",
        ),
        (m + "DIM_FEEDFORWARD", positive, "at least 1"),
        (m + "ENCODER.DIM_FEEDFORWARD", positive, "at least 1"),
        (m + "DROPOUT", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        (m + "NUM_OBJECT_QUERIES", positive, "at least 1"),
        (m + "DEC_LAYERS", positive, "at least 1"),
        (m + "DEC_N_POINTS", positive, "at least 1"),
        (m + "ENCODER.N_POINTS", positive, "at least 1"),
        (m + "ENCODER.NUM_LAYERS", lambda v: v >= 0, "at least 0"),
        (m + "ENCODER.IN_FEATURES", lambda v: len(v) >= 1, "at least one backbone map"),
        (
            m + "NUM_FEATURE_LEVELS",
            lambda v: v >= len(d.ENCODER.IN_FEATURES),
            f"at least the number of MODEL.DI_MASKDINO.ENCODER.IN_FEATURES ({len(d.ENCODER.IN_FEATURES)})",
        ),
        (m + "ENCODER.COMMON_STRIDE", positive, "at least 1"),
        (m + "SIZE_DIVISIBILITY", lambda v: v >= 0, "at least 0"),
        (m + "DN.NUM_QUERIES", lambda v: not d.DN.ENABLED or v >= 1, "at least 1 when DN is enabled"),
        (m + "DN.NOISE_SCALE", lambda v: v >= 0, "at least 0"),
        (m + "BATO.GUIDANCE_SOURCE", lambda v: v in GUIDANCE_SOURCES, f"one of {', '.join(GUIDANCE_SOURCES)}"),
        (m + "BATO.NUM_GUIDING_TOKENS", lambda v: not d.BATO.ENABLED or v >= 1, "at least 1"),
        (m + "LOSS.TRAIN_NUM_POINTS", positive, "at least 1"),
        (m + "LOSS.OVERSAMPLE_RATIO", lambda v: v >= 1, "at least 1"),
        (m + "LOSS.IMPORTANCE_SAMPLE_RATIO", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("TEST.DETECTIONS_PER_IMAGE", positive, "at least 1 (instances kept per image)"),
        ("TEST.AUTOCAST_DTYPE", lambda v: v in ("", "bfloat16", "float16"), '"" (float32), bfloat16 or float16'),
        ("SOLVER.IMS_PER_BATCH", positive, "at least 1"),
        ("SOLVER.BASE_LR", lambda v: v > 0, "positive"),
        ("SOLVER.MAX_ITER", lambda v: v >= 0, "at least 0"),
        ("SOLVER.CHECKPOINT_PERIOD", positive, "at least 1"),
        ("SOLVER.CHECKPOINTS_TO_KEEP", lambda v: v >= 0, "at least 0 (0 keeps all)"),
        ("SOLVER.OPTIMIZER", lambda v: v in ("ADAMW", "SGD"), "ADAMW or SGD"),
        (
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            lambda v: v in ("full_model", "value", "norm"),
            "full_model, value or norm",
        ),
        (
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
            lambda v: not cfg.SOLVER.CLIP_GRADIENTS.ENABLED or v > 0,
            "positive when SOLVER.CLIP_GRADIENTS.ENABLED",
        ),
        ("DATALOADER.NUM_WORKERS", lambda v: v >= 0, "at least 0"),
        # the names of panoptic_data.build_mapper (instance recipes, then the segmentation ones)
        (
            "INPUT.DATASET_MAPPER_NAME",
            lambda v: v in ("lsj", "resize", "panoptic_lsj", "semantic"),
            "lsj, resize, panoptic_lsj or semantic",
        ),
        ("INPUT.FORMAT", lambda v: v in ("RGB", "BGR"), "RGB or BGR"),
        ("INPUT.IMAGE_SIZE", positive, "at least 1"),
        ("INPUT.MIN_SCALE", lambda v: v > 0, "positive"),
        ("INPUT.MAX_SCALE", lambda v: v >= cfg.INPUT.MIN_SCALE, f"at least INPUT.MIN_SCALE ({cfg.INPUT.MIN_SCALE})"),
    ]
    if d.DE_IMBALANCE.ENABLED:
        rules += [
            (
                m + "DE_IMBALANCE.SELECTION_SIZES",
                lambda v: len(v) >= 1 and v[-1] == d.NUM_OBJECT_QUERIES,
                f"a list ending with MODEL.DI_MASKDINO.NUM_OBJECT_QUERIES ({d.NUM_OBJECT_QUERIES})",
            ),
            (
                m + "DE_IMBALANCE.SELECTION_SIZES",
                lambda v: all(a >= b for a, b in zip(v, v[1:])) and all(s >= 1 for s in v),
                "positive sizes that do not grow from one selection to the next",
            ),
            (m + "DE_IMBALANCE.TI_LAYERS", positive, "at least 1"),
        ]
    return rules


def validate_config(cfg) -> None:
    """Raises ConfigError naming every key of `cfg` whose value cannot work."""
    problems = []
    for key, ok, requirement in _rules(cfg):
        value = _value(cfg, key)
        try:
            good = bool(ok(value))
        except TypeError:  # e.g. a string where a number belongs
            good = False
        if not good:
            problems.append(f"  {key} = {value!r}: must be {requirement}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))

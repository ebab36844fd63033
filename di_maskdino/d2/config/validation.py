"""Checks of a loaded configuration: values that cannot work are refused when the config is
loaded, with the key, the value and what it must be - not later, inside a module's
constructor or after hours of training.

`validate_config(cfg)` raises `ConfigError` listing every offending key at once: those of
the model and its losses as the core's descriptions report them (`Architecture.problems`,
`Objective.problems`, named by their keys in `specs.py`), and those of the data, solver and
evaluation below.
"""

import re
from typing import Callable, Dict, List, Tuple

from ...modeling import TEST_MASKS, SpecError
from ..data.build import MAPPER_NAMES
from .specs import ARCHITECTURE_KEYS, OBJECTIVE_KEYS, architecture_from_config, config_value, objective_from_config

__all__ = ["ConfigError", "validate_config", "spec_problem_lines"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key(s)."""


def _rules(cfg) -> List[Tuple[str, Callable[[object], bool], str]]:
    """(key, predicate of its value, what the value must be) of the keys outside the
    model's and the objective's descriptions."""

    def positive(v):
        return v >= 1

    t = cfg.MODEL.DI_MASKDINO.TEST
    return [
        ("MODEL.DI_MASKDINO.SIZE_DIVISIBILITY", lambda v: v >= 0, "at least 0"),
        (
            "MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS",
            lambda v: v in TEST_MASKS,
            f"one of {', '.join(TEST_MASKS)}",
        ),
        (
            "MODEL.DI_MASKDINO.TEST.INSTANCE_ON",
            lambda v: v or t.PANOPTIC_ON or t.SEMANTIC_ON,
            "True unless MODEL.DI_MASKDINO.TEST.PANOPTIC_ON or SEMANTIC_ON is (inference must make something)",
        ),
        ("MODEL.DI_MASKDINO.TEST.TEMPERATURE", lambda v: v >= 0, "at least 0 (0: no sharpening)"),
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
        ("SOLVER.ACCUMULATION_STEPS", positive, "at least 1 (micro-batches per optimizer step)"),
        (
            "SOLVER.LAYER_DECAY",
            lambda v: 0.0 < v <= 1.0,
            "in (0, 1]: the learning-rate factor from one ViT block to the one below (1.0: off)",
        ),
        ("MODEL.VIT.PATCH_SIZE", lambda v: v >= 0, "at least 0 (0: the model's own)"),
        ("MODEL.VIT.DROP_PATH_RATE", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("MODEL.VIT.OUT_CHANNELS", positive, "at least 1"),
        (
            "SOLVER.IMS_PER_BATCH",
            lambda v: cfg.SOLVER.ACCUMULATION_STEPS < 1 or v % cfg.SOLVER.ACCUMULATION_STEPS == 0,
            f"divisible by SOLVER.ACCUMULATION_STEPS ({cfg.SOLVER.ACCUMULATION_STEPS}): the images of one "
            "optimizer step are shared out over its micro-batches",
        ),
        ("MODEL_EMA.DECAY", lambda v: 0.0 < v < 1.0, "in (0, 1), e.g. 0.9998"),
        ("MODEL_EMA.WARMUP_POWER", lambda v: v > 0, "positive (timm's warmup_power; 2/3 or 3/4)"),
        ("DATALOADER.NUM_WORKERS", lambda v: v >= 0, "at least 0"),
        ("INPUT.DATASET_MAPPER_NAME", lambda v: v in MAPPER_NAMES, "one of " + ", ".join(MAPPER_NAMES)),
        ("INPUT.FORMAT", lambda v: v in ("RGB", "BGR"), "RGB or BGR"),
        ("INPUT.IMAGE_SIZE", positive, "at least 1"),
        ("INPUT.MIN_SCALE", lambda v: v > 0, "positive"),
        ("INPUT.MAX_SCALE", lambda v: v >= cfg.INPUT.MIN_SCALE, f"at least INPUT.MIN_SCALE ({cfg.INPUT.MIN_SCALE})"),
    ]


def spec_problem_lines(cfg, error: SpecError, keys: Dict[str, str]) -> List[str]:
    """The problems of `error` as "KEY = value: must be ..." lines of `cfg`, `keys` mapping
    each field to its config key; the fields named in the requirements (in backticks) are
    replaced by their keys too."""
    return [
        f"  {keys[field]} = {config_value(cfg, keys[field])!r}: must be "
        + re.sub(r"`([a-z_.]+)`", lambda match: keys.get(match.group(1), match.group(1)), requirement)
        for field, requirement in error.problems
    ]


def _spec_problems(cfg, build, keys) -> List[str]:
    """The problems `build(cfg)` reports, as `spec_problem_lines`."""
    try:
        build(cfg)
    except SpecError as error:
        return spec_problem_lines(cfg, error, keys)
    return []


def validate_config(cfg) -> None:
    """Raises ConfigError naming every key of `cfg` whose value cannot work."""
    problems = _spec_problems(cfg, architecture_from_config, ARCHITECTURE_KEYS)
    problems += _spec_problems(cfg, objective_from_config, OBJECTIVE_KEYS)
    for key, ok, requirement in _rules(cfg):
        value = config_value(cfg, key)
        try:
            good = bool(ok(value))
        except TypeError:  # e.g. a string where a number belongs
            good = False
        if not good:
            problems.append(f"  {key} = {value!r}: must be {requirement}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))

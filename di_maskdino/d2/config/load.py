"""Loading a configuration: detectron2's defaults, DI-MaskDINO's keys, a config file and
KEY VALUE overrides, checked before anything is built."""

import os
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from ...dependencies import import_build_helper_quietly
from .defaults import add_di_maskdino_config
from .validation import validate_config

__all__ = ["load_config", "use_available_device"]


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2's defaults with DI-MaskDINO's keys, then `config_file`, then `opts`
    (KEY VALUE ... overrides), checked by `validate_config` (a value that cannot work raises
    ConfigError naming the key); not frozen, so that a tool can adjust it before freezing."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} does not exist (the shipped ones are under configs/)")
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    validate_config(cfg)
    import_build_helper_quietly()
    return cfg


def use_available_device(cfg: CfgNode) -> str:
    """Sets MODEL.DEVICE to "cpu" when it names CUDA and CUDA is not available; returns the
    one line that says so ("" when nothing changed)."""
    if torch.cuda.is_available() or not str(cfg.MODEL.DEVICE).startswith("cuda"):
        return ""
    was = cfg.MODEL.DEVICE
    cfg.MODEL.DEVICE = "cpu"
    return f"CUDA is not available: running on the CPU (MODEL.DEVICE {was} -> cpu)"

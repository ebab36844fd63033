"""What the tools share (as detectron2's `engine/defaults.py`): the run's configuration
(`setup`), a `Predictor` built from a config (`build_predictor`), the refusal of an untrained
model (`check_weights`) and an argument parser that keeps config overrides apart
(`ConfigArgumentParser`)."""

import argparse
import logging
import socket
import sys
import time
import urllib.parse
from typing import List, Optional, Sequence, Union

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ...cpu_inference import CPUInference
from ...predictor import Predictor
from ..checkpointer import Checkpointer
from ..config import add_di_maskdino_config, load_config, use_available_device
from ..data.datasets import register_config_datasets
from ..modeling import class_names, detections_to_instances

__all__ = [
    "setup",
    "build_predictor",
    "check_weights",
    "MissingWeightsError",
    "UnreachableMachineError",
    "wait_for_machine_zero",
    "ConfigArgumentParser",
    "TOOL_DEFAULTS",
]

logger = logging.getLogger("di_maskdino")

# config values the tools use unless the command line says otherwise: the CPU inference
# speed-ups (di_maskdino.cpu_inference; TEST.CPU_SPEEDUPS False turns them off)
TOOL_DEFAULTS = ("TEST.CPU_SPEEDUPS", "True")


class MissingWeightsError(ValueError):
    """No weights were given where a trained model is needed."""


class UnreachableMachineError(ConnectionError):
    """The machine of rank 0 does not answer at --dist-url."""


def wait_for_machine_zero(dist_url: str, timeout: float, poll: float = 1.0) -> None:
    """On a machine of rank > 0 of a multi-machine run: waits until the address of `dist_url`
    (tcp://HOST:PORT, where machine 0 listens) accepts a connection, and raises
    UnreachableMachineError naming it and the fixes after `timeout` seconds, instead of
    hanging in the rendezvous."""
    parsed = urllib.parse.urlparse(dist_url)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise UnreachableMachineError(f"--dist-url {dist_url}: give the address of machine 0 as tcp://HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((parsed.hostname, parsed.port), timeout=min(poll, timeout) or 0.1):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise UnreachableMachineError(
                    f"--dist-url {dist_url}: no machine answered within {timeout:.0f} s ({error}). Start machine 0 "
                    "(--machine-rank 0) with the same --dist-url first; check that HOST is machine 0's address as "
                    "seen from here and that PORT is free there and open in its firewall; --dist-timeout sets how "
                    "long to wait."
                ) from error
            time.sleep(poll)


def check_weights(weights: str, *, purpose: str, allow_random: bool = False, how_to_allow: str = "") -> bool:
    """Refuses to run an untrained (randomly initialised) model by mistake.

    weights: the checkpoint to use (MODEL.WEIGHTS); empty means none.
    purpose: what would use the model ("the demo", "the export"), for the message.
    allow_random: run without weights on purpose; a warning says so.
    how_to_allow: how the caller allows it (e.g. "--allow-random-weights"), for the message.
    Returns True when weights are given; raises MissingWeightsError otherwise unless allowed."""
    if weights:
        return True
    if not allow_random:
        allow = f", or pass {how_to_allow} to use an untrained model on purpose" if how_to_allow else ""
        raise MissingWeightsError(
            f"MODEL.WEIGHTS is not set: {purpose} would use an untrained (random) model. Give the weights, e.g. "
            f"MODEL.WEIGHTS output/quick_start/model_final.pth{allow}."
        )
    logger.warning(f"no MODEL.WEIGHTS: {purpose} uses an UNTRAINED model")
    print(f"WARNING: no MODEL.WEIGHTS: {purpose} uses an UNTRAINED model", file=sys.stderr)
    return False


def setup(args, defaults: Sequence[str] = TOOL_DEFAULTS) -> CfgNode:
    """The frozen configuration of a tool's run: `defaults` (KEY VALUE ...), then the config
    file and the KEY VALUE overrides of `args` (`args.config_file`, `args.opts`); on the CPU
    when CUDA is not available (AMP off there); the datasets of DATASETS.COCO_FORMAT
    registered; with detectron2's logging and output-folder setup."""
    cfg = load_config(args.config_file, list(defaults) + list(args.opts))
    device_note = use_available_device(cfg)
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.ENABLED = False
        device_note = (device_note + "; " if device_note else "") + "SOLVER.AMP.ENABLED off (AMP needs CUDA)"
    cfg.freeze()
    register_config_datasets(cfg.DATASETS.COCO_FORMAT)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="di_maskdino", abbrev_name="dimd")
    if device_note:
        logger.warning(device_note)
    return cfg


def build_predictor(
    cfg: CfgNode,
    weights: Optional[str] = None,
    *,
    allow_random_weights: bool = False,
    purpose: str = "the predictor",
    how_to_allow: str = "allow_random_weights=True",
    **kwargs,
) -> Predictor:
    """A `Predictor` of the model `cfg` describes, giving detectron2 `Instances`.

    weights: a checkpoint (default MODEL.WEIGHTS; converted release checkpoints only), which
        must fill the model.
    allow_random_weights: without weights, run the untrained model instead of raising
        (`check_weights`, whose message names `purpose` and `how_to_allow`).
    kwargs: `Predictor` arguments; by default the input format is INPUT.FORMAT for the
        network, the resizing INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, at most
        TEST.DETECTIONS_PER_IMAGE instances per image, the class names those of the
        config's dataset (`class_names`), the CPU speed-ups those of TEST.CPU_SPEEDUPS.

    The instances are those of the detectron2 model's inference (see `Predictor.from_model`):
    a box mask head's refined masks unless MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS is
    "detector" ("both": the refined ones), the things of a panoptic model.
    """
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    check_weights(weights, purpose=purpose, allow_random=allow_random_weights, how_to_allow=how_to_allow)
    model = build_model(cfg).eval()
    if weights:
        Checkpointer.for_evaluation(model, cfg).load(weights)
    settings = dict(
        model_format=cfg.INPUT.FORMAT,
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
        class_names=class_names(cfg),
        convert=detections_to_instances,
        cpu_inference=CPUInference() if cfg.TEST.CPU_SPEEDUPS else None,
    )
    settings.update(kwargs)
    return Predictor.from_model(model, **settings)


class ConfigArgumentParser(argparse.ArgumentParser):
    """An argument parser whose command lines end with config overrides (KEY VALUE ...),
    stored in `args.opts`.

    An option taking several values (`--input a.jpg b.jpg`) would otherwise take the
    overrides that follow it as more of its values; so the overrides start at the first
    word that is the full name of a config value (`MODEL.WEIGHTS`, `OUTPUT_DIR`) and is not
    the value of a one-value option (`--json TEST.JSON` stays a file name)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.one_value_options: set = set()
        self.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS model.pth")

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        if action.nargs is None and action.option_strings:
            self.one_value_options.update(action.option_strings)
        return action

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None) -> argparse.Namespace:
        words: List[str] = list(sys.argv[1:] if args is None else args)
        cfg = get_cfg()
        add_di_maskdino_config(cfg)
        start = next(
            (
                i
                for i, word in enumerate(words)
                if _names_a_value(cfg, word) and (i == 0 or words[i - 1] not in self.one_value_options)
            ),
            len(words),
        )
        parsed = super().parse_args(words[:start], namespace)
        parsed.opts = list(parsed.opts) + words[start:]
        return parsed


def _names_a_value(cfg: CfgNode, word: str) -> bool:
    node: Union[CfgNode, object] = cfg
    for part in word.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, CfgNode)

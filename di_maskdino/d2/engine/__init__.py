"""Training and the tools' shared set-up: the trainer (`trainer.py`), its training step
(`train_step.py`) and hooks (`hooks.py`), and what the tools share (`defaults.py`)."""

from .defaults import (
    TOOL_DEFAULTS,
    ConfigArgumentParser,
    MissingWeightsError,
    UnreachableMachineError,
    build_predictor,
    check_weights,
    setup,
    wait_for_machine_zero,
)
from .hooks import ResumeState
from .train_step import NonFiniteLossError, TrainStep
from .trainer import Trainer

__all__ = [
    "Trainer",
    "TrainStep",
    "NonFiniteLossError",
    "ResumeState",
    "setup",
    "build_predictor",
    "check_weights",
    "MissingWeightsError",
    "UnreachableMachineError",
    "wait_for_machine_zero",
    "ConfigArgumentParser",
    "TOOL_DEFAULTS",
]

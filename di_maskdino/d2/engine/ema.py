"""An exponential moving average (EMA) of the weights, updated after every optimizer step
(MODEL_EMA.*), kept by timm's `ModelEmaV3`.

    ema = decay * ema + (1 - decay) * weights       (parameters and floating-point buffers)

with the decay warmed up as timm does when MODEL_EMA.WARMUP (1 - (1 + step) ** -power,
capped at MODEL_EMA.DECAY), and integer buffers copied. The EMA lives in every checkpoint
under "model_ema" and resumes with it; evaluation during training, `--eval-only`, the demo,
the `Predictor` and the export load it instead of the trained weights when
MODEL_EMA.USE_FOR_EVALUATION (a checkpoint without one loads its trained weights).

Under DistributedDataParallel every process updates its own EMA from its own copy of the
weights. The copies are equal after every step (the same initial weights, gradients
all-reduced before the step, the same optimizer), so the EMAs are equal too, without any
communication; tests/d2/engine/test_ema.py checks it with 2 processes.
"""

import logging
from typing import Any, Dict

import torch
from detectron2.engine import HookBase
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from ..checkpointer import CheckpointMismatchError

__all__ = ["WeightEMA", "unwrapped"]

logger = logging.getLogger(__name__)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class WeightEMA(HookBase):
    """The EMA of the weights of the trainer's model, as a hook (update after each step) and
    as a checkpointable (its state is the averaged weights)."""

    def __init__(self, model: torch.nn.Module, *, decay: float, warmup: bool, warmup_power: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in (0, 1), got {decay}")
        self.ema = ModelEmaV3(
            unwrapped(model), decay=decay, use_warmup=warmup, warmup_power=warmup_power, foreach=True
        )

    @property
    def module(self) -> torch.nn.Module:
        """The model holding the averaged weights (in evaluation mode)."""
        return self.ema.module

    def after_step(self):
        # step counts optimizer steps from 1; timm's warm-up starts from it
        self.ema.update(unwrapped(self.trainer.model), step=self.trainer.iter + 1)

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        expected = {k: tuple(v.shape) for k, v in self.ema.module.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))
            unexpected = sorted(set(found) - set(expected))
            shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            raise CheckpointMismatchError(
                "the checkpoint's EMA weights (model_ema) do not fit the model built from the config: "
                f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape "
                f"(e.g. {(missing + unexpected + shapes)[:3]}). Resume with the config the run was trained with, "
                "or start the EMA afresh from this checkpoint's weights with MODEL.WEIGHTS and without --resume."
            )
        self.ema.module.load_state_dict(state)

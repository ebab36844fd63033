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
from typing import Any, Dict, Optional

import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

from ..checkpointer import CheckpointMismatchError

__all__ = ["EMAWeights", "WeightEMAHook", "build_ema", "unwrapped"]

logger = logging.getLogger(__name__)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EMAWeights:
    """The averaged weights (timm's `ModelEmaV3` over the unwrapped model), and their
    checkpoint entry "model_ema" (`state_dict` / `load_state_dict`, checked against the
    model)."""

    def __init__(self, model: torch.nn.Module, *, decay: float, warmup: bool, warmup_power: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in (0, 1), got {decay}")
        from timm.utils import ModelEmaV3  # imported when used: timm is a large import

        self.ema = ModelEmaV3(unwrapped(model), decay=decay, use_warmup=warmup, warmup_power=warmup_power)
        self.loaded = False  # whether a checkpoint's "model_ema" was loaded

    @property
    def module(self) -> torch.nn.Module:
        """The model holding the averaged weights (in evaluation mode)."""
        return self.ema.module

    def update(self, model: torch.nn.Module, step: int) -> None:
        """One update after optimizer step `step` (counted from 1; timm's warm-up starts from it)."""
        self.ema.update(unwrapped(model), step=step)

    @torch.no_grad()
    def restart_from(self, model: torch.nn.Module) -> None:
        """The average restarted at the model's current weights."""
        self.ema.module.load_state_dict(unwrapped(model).state_dict())

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
                f"(e.g. {(missing + unexpected + shapes)[:3]}). Resume with the config the run was trained with "
                "(MODEL_EMA included), or start from this checkpoint's weights with MODEL.WEIGHTS and without --resume."
            )
        self.ema.module.load_state_dict(state)
        self.loaded = True


class WeightEMAHook(HookBase):
    """Updates `weights` after every optimizer step of the trainer."""

    def __init__(self, weights: EMAWeights):
        self.weights = weights

    def after_step(self):
        self.weights.update(self.trainer.model, step=self.trainer.iter + 1)


def build_ema(cfg, model: torch.nn.Module) -> Optional[EMAWeights]:
    """The EMA of `model`'s weights MODEL_EMA describes, or None when it is off."""
    e = cfg.MODEL_EMA
    if not e.ENABLED:
        return None
    return EMAWeights(model, decay=e.DECAY, warmup=e.WARMUP, warmup_power=e.WARMUP_POWER)

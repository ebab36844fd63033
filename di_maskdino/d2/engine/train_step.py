"""One training iteration: `TrainStep`, detectron2's `SimpleTrainer` with its own `run_step`
(detectron2's documented way to change the step).

The step is detectron2's - next batch, forward, backward, metrics, optimizer step - with
mixed precision when asked (a `GradScaler`, as detectron2's AMPTrainer, whose checkpoint
entry "grad_scaler" it keeps), and with a check of the loss terms before backward: every
process reports its non-finite terms and all stop with one message naming the iteration,
the terms and the likely causes (so that no process waits for another, and the last
checkpoint stays the one before the step).
"""

import contextlib
import time
from typing import Dict, List

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

__all__ = ["TrainStep", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the terms."""


class TrainStep(SimpleTrainer):
    """
    Args:
        model, data_loader, optimizer: as for detectron2's SimpleTrainer.
        amp: mixed precision (autocast to `precision` on the model's device type, gradients
            scaled by a GradScaler).
    """

    def __init__(self, model, data_loader, optimizer, *, amp: bool = False, precision: torch.dtype = torch.float16):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if amp else None

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("TrainStep: the model was put in eval mode during training")
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        try:
            with self._precision():
                loss_dict = self.model(data)
        except FloatingPointError as error:  # the matcher's non-finite costs
            if isinstance(error, NonFiniteLossError) or str(error).startswith("iteration "):
                raise
            raise FloatingPointError(f"iteration {self.iter}: {error}") from error
        self.check_finite(loss_dict)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        (losses if self.grad_scaler is None else self.grad_scaler.scale(losses)).backward()
        self.after_backward()
        SimpleTrainer.write_metrics(loss_dict, data_time, self.iter)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def _precision(self):
        if self.grad_scaler is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.precision)

    def check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Raises NonFiniteLossError on every process when any process has a non-finite term."""
        bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v.detach()).all())
        everyone = comm.all_gather(bad) if comm.get_world_size() > 1 else [bad]
        if any(everyone):
            raise NonFiniteLossError(self._message(everyone, len(loss_dict)))

    def _message(self, bad_per_process: List[List[str]], total: int) -> str:
        terms = sorted({k for bad in bad_per_process for k in bad})
        where = (
            "" if len(bad_per_process) == 1 else f" on process(es) {[r for r, b in enumerate(bad_per_process) if b]}"
        )
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        return (
            f"the loss became NaN/inf at iteration {self.iter}{where}: {len(terms)} of {total} terms - "
            f"{', '.join(terms[:30])}{' ...' if len(terms) > 30 else ''}.\n"
            "Likely causes: a learning rate too high for this batch size "
            f"(SOLVER.BASE_LR; the current largest is {lr:.3g}), "
            + ("half-precision overflow (SOLVER.AMP.ENABLED True; try False), " if self.grad_scaler else "")
            + "or degenerate annotations (boxes or masks of zero size). The last checkpoint in OUTPUT_DIR was written "
            "before this step; fix the cause and continue with --resume."
        )

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

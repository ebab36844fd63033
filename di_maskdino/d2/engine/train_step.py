"""One training iteration: `TrainStep`, detectron2's `SimpleTrainer` with its own `run_step`
(detectron2's documented way to change the step).

The step is detectron2's - next batch, forward, backward, metrics, optimizer step - with

- mixed precision when asked (a `GradScaler`, as detectron2's AMPTrainer, whose checkpoint
  entry "grad_scaler" it keeps; the scaler steps once per optimizer step);
- gradient accumulation (SOLVER.ACCUMULATION_STEPS = k): k micro-batches, one after the
  other, make one optimizer step. The losses of every micro-batch are normalised by the
  number of target objects of all k micro-batches of all processes (what the criterion does
  for one batch), so that their sum is the loss of the k-times larger batch and the
  accumulated gradient is its gradient; DistributedDataParallel synchronises the gradients
  on the last micro-batch only;
- a check of the loss terms before the optimizer step: every process reports its non-finite
  terms and all stop with one message naming the iteration, the terms and the likely causes
  (so that no process waits for another, and the last checkpoint stays the one before the
  step). The terms come to the host in one copy, for the check and for detectron2's metric
  logging: one synchronisation with a GPU per step, where a term-by-term check and log would
  make two per term.
"""

import contextlib
import math
import time
from typing import Dict, List

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["TrainStep", "NonFiniteLossError", "count_objects"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the terms."""


def count_objects(micro_batches: List[List[dict]]) -> float:
    """The criterion's normaliser for micro-batches of detectron2 inputs taken together: their
    target objects, summed over all processes and averaged per process (at least 1), as
    `SetCriterion` counts them for one batch."""
    count = sum(len(item["instances"]) for batch in micro_batches for item in batch)
    if comm.get_world_size() > 1:
        total = torch.tensor([float(count)], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            total = total.cuda(torch.cuda.current_device())
        torch.distributed.all_reduce(total)
        count = total.item() / comm.get_world_size()
    return max(float(count), 1.0)


class TrainStep(SimpleTrainer):
    """
    Args:
        model, data_loader, optimizer: as for detectron2's SimpleTrainer; the loader gives
            micro-batches.
        amp: mixed precision (autocast to `precision` on the model's device type, gradients
            scaled by a GradScaler).
        accumulation_steps: micro-batches per optimizer step.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        amp: bool = False,
        precision: torch.dtype = torch.float16,
        accumulation_steps: int = 1,
    ):
        if accumulation_steps < 1:
            raise ValueError(f"SOLVER.ACCUMULATION_STEPS must be at least 1, got {accumulation_steps}")
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if amp else None
        self.accumulation_steps = accumulation_steps

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("TrainStep: the model was put in eval mode during training")
        start = time.perf_counter()
        micro_batches = [next(self._data_loader_iter) for _ in range(self.accumulation_steps)]
        data_time = time.perf_counter() - start
        accumulating = self.accumulation_steps > 1
        normaliser = {"num_objects": count_objects(micro_batches)} if accumulating else {}
        self.optimizer.zero_grad()
        total: Dict[str, torch.Tensor] = {}
        for index, data in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self._synchronised(last):
                loss_dict = self._forward(data, normaliser)
                losses = sum(loss_dict.values())
                (losses if self.grad_scaler is None else self.grad_scaler.scale(losses)).backward()
            for key, value in loss_dict.items():
                total[key] = total[key] + value.detach() if key in total else value.detach()
        self.after_backward()
        # every loss term to the host in one copy (one synchronisation on a GPU): checked, then
        # logged by detectron2 from the host values
        host = dict(zip(total, torch.stack(list(total.values())).float().cpu().unbind()))
        self.check_finite(host)
        SimpleTrainer.write_metrics(host, data_time, self.iter)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def _forward(self, data, normaliser) -> Dict[str, torch.Tensor]:
        try:
            with self._precision():
                return self.model(data, **normaliser)
        except FloatingPointError as error:  # the matcher's non-finite costs
            if isinstance(error, NonFiniteLossError) or str(error).startswith("iteration "):
                raise
            raise FloatingPointError(f"iteration {self.iter}: {error}") from error

    def _synchronised(self, last: bool):
        """DDP all-reduces the gradients in the backward of the last micro-batch only."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _precision(self):
        if self.grad_scaler is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.precision)

    def check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Raises NonFiniteLossError on every process when any process has a non-finite term
        (`loss_dict`: the terms on the host)."""
        bad = sorted(k for k, v in loss_dict.items() if not math.isfinite(float(v)))
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

"""Activation checkpointing and precision helpers shared by the model's parts.

Activation checkpointing keeps only a region's inputs in the forward pass and runs the
region again during backward to get the activations its gradients need: memory for time.
We use PyTorch's non-reentrant implementation (`torch.utils.checkpoint`, use_reentrant=False):
it works with any inputs (dataclasses, keyword arguments, tensors that do not require
gradients), with autocast (the recomputation runs under the autocast state of the forward),
with DistributedDataParallel (parameters get their gradient once), and it restores the RNG
state for the recomputation, so that dropout draws the same mask twice.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "CheckpointedSequential", "at_least_float32"]


def checkpointed(enabled: bool, function, *args, **kwargs):
    """`function(*args, **kwargs)`, under activation checkpointing when `enabled` and
    gradients are being recorded (in inference there is nothing to save)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


class CheckpointedSequential(nn.Sequential):
    """An `nn.Sequential` that runs as one checkpointed region when gradients are recorded:
    only its input is kept, its children's activations are recomputed in backward. Its
    children and parameter names are those of the Sequential it is made from
    (`CheckpointedSequential(*stage)`), so checkpoints load unchanged.

    NOTE: one region per ResNet stage rather than per block: the block inputs of a stage
    would stay allocated through the forward pass (0.5 GiB for ResNet-50 at 1024 x 1024),
    whereas a stage's recomputation happens late in backward, when little else is alive."""

    def forward(self, x):
        return checkpointed(True, super().forward, x)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 tensors as float32; float32 and float64 unchanged (the parts that
    run outside autocast compute in at least single precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

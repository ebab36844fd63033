"""Activation checkpointing (Architecture.checkpointing): in training, with denoising
queries, every deep-supervision output and dropout, each switch gives the losses and
gradients of the unchecked model (float64) and keeps less for backward."""

import pytest
import torch

from di_maskdino.modeling import ActivationCheckpointing
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher

from ..layers.test_checkpoint import saved_bytes
from .tiny import all_predictions, perturb, tiny_images, tiny_mask_targets, tiny_model

SWITCHES = ("backbone", "encoder", "token_interaction", "decoder")


def training_step(switches, dtype=torch.float64, dropout=0.0, autocast=False):
    """(bytes kept for backward by the forward, output, losses, gradients by name)."""
    model = tiny_model(checkpointing=ActivationCheckpointing(**{s: True for s in switches}), dropout=dropout)
    model = perturb(model).to(dtype).train()
    batch, _ = model.preprocess(tiny_images())
    batch = batch.to(dtype)
    targets = tiny_mask_targets(dtype)
    criterion = SetCriterion(HungarianMatcher(num_points=64), num_points=64)
    torch.manual_seed(0)  # denoising noise, dropout, matcher and loss points
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved, output = saved_bytes(lambda: model(batch, targets=targets))
        losses = criterion(output, targets)
    sum(losses.values()).backward()
    return saved, output, losses, {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def unchecked():
    return training_step(())


def assert_same_training(result, reference, rtol=1e-10, atol=1e-12):
    _, output, losses, grads = result
    _, ref_output, ref_losses, ref_grads = reference
    # every supervised output is there: initial prediction, decoder layers, encoder, DI, denoising
    assert [name for name, _ in all_predictions(output)] == [name for name, _ in all_predictions(ref_output)]
    assert output.denoising is not None and output.denoising.queries is not None
    assert set(losses) == set(ref_losses)
    for key, value in losses.items():
        torch.testing.assert_close(value, ref_losses[key], rtol=rtol, atol=atol, msg=key)
    assert [n for n, g in grads.items() if g is None] == []
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_keeps_losses_and_gradients_and_saves_memory(switch, unchecked):
    result = training_step((switch,))
    assert_same_training(result, unchecked)
    assert result[0] < unchecked[0], f"{switch}: {result[0]} bytes kept for backward, unchecked {unchecked[0]}"


def test_all_switches_together(unchecked):
    result = training_step(SWITCHES)
    assert_same_training(result, unchecked)
    assert result[0] < unchecked[0]


@pytest.mark.slow
def test_dropout_is_replayed_in_the_recomputation():
    assert_same_training(training_step(SWITCHES, dropout=0.2), training_step((), dropout=0.2))


@pytest.mark.slow
def test_under_autocast():
    """bfloat16 autocast on the CPU: the recomputation runs under the forward's autocast state."""
    assert_same_training(
        training_step(SWITCHES, torch.float32, autocast=True),
        training_step((), torch.float32, autocast=True),
        rtol=1e-6,
        atol=1e-7,
    )


def test_switches_are_off_by_default():
    model = tiny_model()
    assert not model.encoder.grad_checkpointing
    assert not model.head.decoder.grad_checkpointing
    assert not any(stage.grad_checkpointing for stage in model.head.de_imbalance.stages)
    assert not model.backbone.grad_checkpointing


def test_backbone_switch_needs_a_checkpointable_backbone():
    from torch import nn

    from di_maskdino.modeling import build_model

    from .tiny import TinyBackbone, tiny_architecture

    class Plain(nn.Module):  # a backbone without set_grad_checkpointing
        def __init__(self):
            super().__init__()
            self.inner = TinyBackbone()

        def output_shape(self):
            return self.inner.output_shape()

    arch = tiny_architecture(checkpointing=ActivationCheckpointing(backbone=True))
    with pytest.raises(ValueError, match="has no set_grad_checkpointing"):
        build_model(arch, Plain())
    with_batch_norm = TinyBackbone()
    with_batch_norm.stages[0].append(nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="BatchNorm.*running statistics"):
        build_model(arch, with_batch_norm)

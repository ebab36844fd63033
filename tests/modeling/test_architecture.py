"""Activation checkpointing (Architecture.checkpointing): in training, with denoising
queries, every deep-supervision output and dropout, each switch gives the losses and
gradients of the unchecked model (float64) and keeps less for backward."""

import pytest
import torch

from di_maskdino.modeling import ActivationCheckpointing
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher

from ..layers.test_activation_checkpointing import saved_bytes
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


@pytest.mark.slow
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


def _ddp_worker(rank: int, world_size: int, init_file: str, results: str):
    """One process of a two-process gloo group: each switch setting trains one step under
    DistributedDataParallel on this rank's images; the averaged gradients are saved."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gradients = {}
        for switches in ((), SWITCHES):
            model = tiny_model(checkpointing=ActivationCheckpointing(**{s: True for s in switches}))
            model = perturb(model).double().train()
            ddp = DistributedDataParallel(model)
            batch, _ = model.preprocess(tiny_images(seed=rank))
            targets = tiny_mask_targets(torch.float64)
            criterion = SetCriterion(HungarianMatcher(num_points=64), num_points=64)
            torch.manual_seed(rank)
            losses = criterion(ddp(batch.double(), targets=targets), targets)
            sum(losses.values()).backward()
            gradients[len(switches)] = {n: p.grad for n, p in model.named_parameters()}
        torch.save(gradients, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel(tmp_path):
    """Two CPU processes: with every switch on, DDP's averaged gradients are those of the
    unchecked model on every rank (no parameter is reduced twice or missed)."""
    import torch.multiprocessing as mp

    results = str(tmp_path / "gradients")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    per_rank = [torch.load(f"{results}.{rank}") for rank in range(2)]
    for gradients in per_rank:
        plain, checked = gradients[0], gradients[len(SWITCHES)]
        assert [n for n, g in checked.items() if g is None] == []
        for name, grad in checked.items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-10, atol=1e-12, msg=name)
    for name, grad in per_rank[0][0].items():  # the reduction happened: the ranks agree
        torch.testing.assert_close(grad, per_rank[1][0][name], rtol=1e-12, atol=1e-14, msg=name)

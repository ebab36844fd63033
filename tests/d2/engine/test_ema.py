"""The EMA of the weights (MODEL_EMA): the formula applied by hand to the recorded weights
(float64), buffers as timm handles them, frozen parameters left alone, equal EMAs on every
process of a distributed run, the checkpoint entry, and evaluation loading it."""

import socket
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see INSTALL.md)")

from di_maskdino.d2 import CheckpointMismatchError, ConfigError, load_config  # noqa: E402
from di_maskdino.d2.checkpointer import Checkpointer  # noqa: E402
from di_maskdino.d2.engine.ema import EMAWeights, WeightEMAHook  # noqa: E402
from tests.tooling import QUICK  # noqa: E402


class Small(nn.Module):
    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        # float running statistics and an integer counter
        self.norm = nn.BatchNorm1d(4) if batch_norm else nn.GroupNorm(2, 4)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x):
        return self.norm(self.linear(x)) * self.frozen[:4]


def train_steps(model, steps, hook, seed=0):
    """`steps` SGD steps on random data, the hook updating after each; returns the weights
    (state dict copies) after every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    trainer = SimpleNamespace(model=model, iter=0)
    hook.trainer = trainer
    recorded = []
    for iteration in range(steps):
        trainer.iter = iteration
        optimizer.zero_grad()
        model(torch.randn(8, 3, generator=generator, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
        hook.after_step()
        recorded.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return recorded


def expected_average(recorded, decay, power=None):
    """ema_1 = w_1; ema_k = d_k ema_{k-1} + (1 - d_k) w_k, with d_k = decay, or with warm-up
    d_k = min(decay, 1 - (1 + (k - 1)) ** -power); integer entries copied."""
    average = {k: v.clone() for k, v in recorded[0].items()}
    for k, weights in enumerate(recorded[1:], start=2):
        d = decay if power is None else min(decay, 1 - (1 + (k - 1)) ** -power)
        for name, value in weights.items():
            average[name] = d * average[name] + (1 - d) * value if value.is_floating_point() else value.clone()
    return average


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_is_the_formula_applied_to_the_recorded_weights(warmup):
    torch.manual_seed(0)
    model = Small().double().train()
    frozen = model.frozen.detach().clone()
    ema = EMAWeights(model, decay=0.8, warmup=warmup, warmup_power=0.75)
    recorded = train_steps(model, 7, WeightEMAHook(ema))
    expected = expected_average(recorded, 0.8, 0.75 if warmup else None)
    found = ema.module.state_dict()
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert found["norm.num_batches_tracked"].item() == 7  # copied, as timm does for integers
    assert torch.equal(found["frozen"], frozen)  # a frozen parameter stays as it is
    assert not torch.allclose(found["linear.weight"], recorded[-1]["linear.weight"])  # an average, not a copy


def test_decay_outside_the_open_interval_is_refused():
    with pytest.raises(ValueError, match=r"MODEL_EMA.DECAY must be in \(0, 1\)"):
        EMAWeights(Small(), decay=1.0, warmup=False, warmup_power=0.75)
    with pytest.raises(ConfigError, match=r"MODEL_EMA.DECAY = 0.0: must be in \(0, 1\)"):
        load_config(QUICK, ["MODEL_EMA.DECAY", "0.0"])


def test_checkpoint_entry_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = Small().double()
    ema = EMAWeights(model, decay=0.5, warmup=False, warmup_power=0.75)
    train_steps(model, 3, WeightEMAHook(ema))
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.add_checkpointable("model_ema", ema)
    checkpointer.save("model_0000002")

    fresh_model = Small().double()
    fresh = EMAWeights(fresh_model, decay=0.5, warmup=False, warmup_power=0.75)
    loader = Checkpointer(fresh_model, str(tmp_path))
    loader.add_checkpointable("model_ema", fresh)
    loader.resume_or_load("", resume=True)
    assert fresh.loaded
    for name, value in ema.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)

    other = nn.Linear(3, 4).double()
    mismatched = EMAWeights(other, decay=0.5, warmup=False, warmup_power=0.75)
    loader = Checkpointer(other, str(tmp_path), mode="partial")
    loader.add_checkpointable("model_ema", mismatched)
    with pytest.raises(CheckpointMismatchError, match="EMA weights \\(model_ema\\) do not fit"):
        loader.resume_or_load("", resume=True)


def test_evaluation_loads_the_ema_weights_when_the_config_says_so(tmp_path):
    torch.manual_seed(0)
    model = Small().double()
    ema = EMAWeights(model, decay=0.5, warmup=False, warmup_power=0.75)
    train_steps(model, 3, WeightEMAHook(ema))
    path = tmp_path / "with_ema.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict()}, path)
    plain_path = tmp_path / "without_ema.pth"
    torch.save({"model": model.state_dict()}, plain_path)
    for enabled, use, weights, expected in [
        (True, True, path, ema.state_dict()),
        (True, False, path, model.state_dict()),
        (False, True, path, model.state_dict()),
        (True, True, plain_path, model.state_dict()),  # no EMA in the file: its trained weights
    ]:
        cfg = load_config(QUICK, ["MODEL_EMA.ENABLED", str(enabled), "MODEL_EMA.USE_FOR_EVALUATION", str(use)])
        target = Small().double()
        Checkpointer.for_evaluation(target, cfg).load(str(weights))
        for name, value in expected.items():
            assert torch.equal(target.state_dict()[name], value), (enabled, use, weights.name, name)


def _distributed(rank, world, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on both processes
        # GroupNorm, as in the model: no statistics that a process computes from its own data
        model = nn.parallel.DistributedDataParallel(Small(batch_norm=False).double().train())
        ema = EMAWeights(model, decay=0.7, warmup=True, warmup_power=0.75)
        recorded = train_steps(model, 5, WeightEMAHook(ema), seed=rank)  # other data on each process
        expected = expected_average([{k[len("module.") :]: v for k, v in r.items()} for r in recorded], 0.7, 0.75)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {k: v.clone() for k, v in ema.state_dict().items()})
        agree = all(torch.equal(gathered[0][k], g[k]) for g in gathered for k in gathered[0])
        formula = all(torch.allclose(ema.state_dict()[k], expected[k], rtol=1e-12, atol=1e-12) for k in expected)
        results[rank] = (agree, formula)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_equal_averages():
    """Each process updates its own EMA from its own weights, which DDP keeps equal (the
    gradients are all-reduced before every step): the EMAs agree bit for bit, with no
    communication of their own. (Running statistics that each process computes from its own
    data, BatchNorm's without SyncBN, differ between processes, and so do their averages.)"""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_distributed, args=(2, free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, True), 1: (True, True)}

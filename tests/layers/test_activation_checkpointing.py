"""Activation checkpointing helpers: same values and gradients, fewer saved activations,
dropout replayed, parameter names kept."""

import torch
from torch import nn

from di_maskdino.layers import FFN, CheckpointedSequential, at_least_float32, checkpointed


def saved_bytes(function):
    """Bytes of the distinct storages autograd keeps for backward while `function` runs."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return sum(storages.values()), result


def gradients(module, inputs, enabled, seed=0):
    module.zero_grad()
    x = inputs.clone().requires_grad_()
    torch.manual_seed(seed)
    saved, out = saved_bytes(lambda: checkpointed(enabled, module, x))
    out.square().sum().backward()
    return saved, out.detach(), [p.grad.clone() for p in module.parameters()] + [x.grad]


def test_checkpointed_gives_the_same_values_and_gradients_and_saves_less():
    torch.manual_seed(0)
    ffn = FFN(16, 64, dropout=0.0).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    plain_saved, plain_out, plain_grads = gradients(ffn, x, enabled=False)
    saved, out, grads = gradients(ffn, x, enabled=True)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, expected in zip(grads, plain_grads):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert saved < plain_saved


def test_dropout_draws_the_same_mask_when_recomputed():
    torch.manual_seed(0)
    ffn = FFN(16, 64, dropout=0.5).double().train()
    x = torch.randn(4, 16, dtype=torch.float64)
    _, plain_out, plain_grads = gradients(ffn, x, enabled=False, seed=3)
    _, out, grads = gradients(ffn, x, enabled=True, seed=3)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, expected in zip(grads, plain_grads):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_no_checkpoint_without_gradients():
    ffn = FFN(8, 16)
    with torch.no_grad():
        saved, _ = saved_bytes(lambda: checkpointed(True, ffn, torch.randn(2, 8)))
    assert saved == 0


def test_checkpointed_sequential_keeps_parameter_names_and_gradients():
    torch.manual_seed(0)

    def block():  # a bottleneck: its activations are larger than its input
        return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1))

    stage = nn.Sequential(block(), block()).double()
    wrapped = CheckpointedSequential(*stage)
    assert list(wrapped.state_dict()) == list(stage.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    plain_saved, plain_out, plain_grads = gradients(stage, x, enabled=False)
    # the Sequential is one checkpointed region: only its input is kept
    saved, out, grads = gradients(wrapped, x, enabled=False)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, expected in zip(grads, plain_grads):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert saved < plain_saved


def test_at_least_float32():
    assert at_least_float32(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
    assert at_least_float32(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_float32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    x = torch.zeros(1)
    assert at_least_float32(x) is x

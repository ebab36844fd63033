"""The multi-scale deformable attention operator against its grid_sample reference."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from di_maskdino.ops import kernel_available, ms_deform_attn, ms_deform_attn_reference

# the module (its name is shadowed in di_maskdino.ops by the function it defines)
msda_module = importlib.import_module("di_maskdino.ops.ms_deform_attn")

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.device("cpu")),
    reason=f"the compiled CPU kernel is not available ({msda_module.extension_status()})",
)

# Non-square levels of different sizes, the largest first as in the encoder.
LEVELS = [(9, 13), (5, 7), (3, 2), (1, 4)]


def make_problem(batch, heads, channels, queries, points, levels=LEVELS, dtype=torch.float64, seed=0):
    """Random inputs; a quarter of the locations lie outside [0, 1] and some sit exactly on
    the map border, on pixel centres and on pixel edges."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.5 - 0.25
    flat = locations.view(-1, 2)
    special = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [0.5, 0.0]], dtype=dtype)
    count = min(len(special), flat.shape[0])
    flat[:count] = special[:count]
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator, dtype=dtype)
    return value, shapes, starts, locations, weights


CASES = [
    dict(batch=2, heads=1, channels=3, queries=5, points=1),
    dict(batch=2, heads=8, channels=4, queries=6, points=4),
    dict(batch=3, heads=1, channels=5, queries=4, points=4),
    dict(batch=2, heads=8, channels=2, queries=3, points=1),
]


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_float64(case):
    inputs = make_problem(**case)
    expected = ms_deform_attn_reference(*inputs)
    actual = ms_deform_attn(*inputs)
    assert actual.shape == (case["batch"], case["queries"], case["heads"] * case["channels"])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_float32(case):
    inputs64 = make_problem(**case)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    expected = ms_deform_attn_reference(*inputs64)
    actual = ms_deform_attn(*inputs32)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize(
    "case",
    [
        dict(batch=2, heads=8, channels=32, queries=7, points=4),
        dict(batch=1, heads=2, channels=32, queries=40, points=3),
    ],
)
def test_forward_of_32_channel_heads_is_as_accurate_as_float32_allows(case):
    # 32 channels per head (the released models' 256 / 8) take the CPU forward's sums held in
    # registers; against float64, its error must be that of PyTorch's own float32 evaluation
    inputs64 = make_problem(**case)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    expected = ms_deform_attn_reference(*inputs64)
    error = (ms_deform_attn(*inputs32).double() - expected).abs().max().item()
    float32_error = (ms_deform_attn_reference(*inputs32).double() - expected).abs().max().item()
    assert error <= 2 * float32_error + 1e-7


@needs_kernel
def test_forward_of_32_channel_heads_equals_the_generic_sums_bit_for_bit():
    # the same heads padded to 64 channels take the generic loop; their first 32 channels
    # must come out bit-equal to the 32-channel path's register-held sums
    value, shapes, starts, locations, weights = [
        t.float() if t.is_floating_point() else t for t in make_problem(2, 8, 32, 9, 4)
    ]
    padded = torch.cat([value, torch.randn_like(value)], dim=-1)
    narrow = ms_deform_attn(value, shapes, starts, locations, weights).view(2, 9, 8, 32)
    wide = ms_deform_attn(padded, shapes, starts, locations, weights).view(2, 9, 8, 64)
    assert torch.equal(narrow, wide[..., :32])


def test_reference_samples_pixel_centres_exactly():
    """Hand-made oracle for the sampling rule shared by kernel and reference: on a 2 x 3
    map, location ((j + 0.5) / W, (i + 0.5) / H) reads pixel (i, j); half-way between two
    centres reads their mean; one pixel beyond the border reads half the edge pixel; further
    out reads zero."""
    grid = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1) + 1  # pixel (i, j) = 3 i + j + 1
    shapes = torch.tensor([[2, 3]])
    starts = torch.tensor([0])
    points = torch.tensor(
        [[0.5 / 3, 0.5 / 2], [2.5 / 3, 1.5 / 2], [1.0 / 3, 0.5 / 2], [0.0, 0.5 / 2], [1.5, 0.5]],
        dtype=torch.float64,
    )
    locations = points.view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    expected = torch.tensor([1.0, 6.0, 1.5, 0.5, 0.0], dtype=torch.float64).view(1, 5, 1)
    functions = [ms_deform_attn_reference] + ([ms_deform_attn] if kernel_available(torch.device("cpu")) else [])
    for function in functions:
        torch.testing.assert_close(function(grid, shapes, starts, locations, weights), expected, rtol=0, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("case", CASES[:2])
def test_backward_matches_reference(case):
    inputs = list(make_problem(**case))
    for index in (0, 3, 4):
        inputs[index].requires_grad_(True)
    grad_output = torch.randn(case["batch"], case["queries"], case["heads"] * case["channels"], dtype=torch.float64)
    differentiable = [inputs[0], inputs[3], inputs[4]]
    expected = torch.autograd.grad(ms_deform_attn_reference(*inputs), differentiable, grad_output)
    actual = torch.autograd.grad(ms_deform_attn(*inputs), differentiable, grad_output)
    for name, a, e in zip(("value", "sampling_locations", "attention_weights"), actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


@needs_kernel
@pytest.mark.parametrize("points", [1, 4])
def test_gradcheck_float64(points):
    value, shapes, starts, locations, weights = make_problem(2, 2, 3, 3, points, levels=[(4, 3), (2, 5)])
    # gradcheck's finite differences need locations away from pixel edges, where the
    # bilinear weights have kinks; random locations almost surely are.
    locations = torch.rand(locations.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    args = [value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_()]
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-5)


@needs_kernel
def test_operator_registration_passes_opcheck():
    """PyTorch's own check of a custom op: schema, fake kernel, autograd registration and
    the dispatcher paths used by torch.compile."""
    inputs = list(make_problem(2, 2, 3, 4, 2, dtype=torch.float32))
    inputs[0].requires_grad_(True)
    inputs[3].requires_grad_(True)
    inputs[4].requires_grad_(True)
    torch.library.opcheck(torch.ops.di_maskdino.ms_deform_attn_forward.default, inputs)


@needs_kernel
def test_backward_deterministic_across_threads():
    """The value gradient is accumulated without atomics; with several threads the result
    must not change from run to run or with the thread count."""
    inputs = list(make_problem(2, 8, 8, 64, 4, dtype=torch.float32))
    inputs[0].requires_grad_(True)
    previous_threads = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            (grad,) = torch.autograd.grad(ms_deform_attn(*inputs).square().sum(), inputs[0])
            results.append(grad)
    finally:
        torch.set_num_threads(previous_threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_bands_match_reference_for_any_thread_count(threads):
    """With B * H * L = 2 work items the CPU backward cuts every level into bands of rows (more
    bands with more threads, some empty on the 2-row level): the gradients must match the
    reference and be the same bits for every thread count."""
    inputs = list(make_problem(1, 1, 5, 40, 3, levels=[(9, 13), (2, 7)]))
    for index in (0, 3, 4):
        inputs[index].requires_grad_(True)
    grad_output = torch.randn(1, 40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    differentiable = [inputs[0], inputs[3], inputs[4]]
    expected = torch.autograd.grad(ms_deform_attn_reference(*inputs), differentiable, grad_output)
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.autograd.grad(ms_deform_attn(*inputs), differentiable, grad_output)
        torch.set_num_threads(threads)
        actual = torch.autograd.grad(ms_deform_attn(*inputs), differentiable, grad_output)
    finally:
        torch.set_num_threads(previous_threads)
    for a, e, s in zip(actual, expected, single):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
        assert torch.equal(a, s)


def test_operator_imports_with_torch_alone():
    """di_maskdino.ops is what dev/gpu_check.sh needs on a machine with PyTorch and nothing
    else: it must import, and run, without fvcore (or detectron2)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fvcore', 'detectron2', 'scipy', 'yacs', 'pycocotools'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from di_maskdino.ops import ms_deform_attn\n"
        "value = torch.zeros(1, 6, 1, 2)\n"
        "out = ms_deform_attn(\n"
        "    value, torch.tensor([[2, 3]]), torch.tensor([0]),\n"
        "    torch.rand(1, 4, 1, 1, 1, 2), torch.ones(1, 4, 1, 1, 1),\n"
        ")\n"
        "assert out.shape == (1, 4, 2)\n"
    )
    root = Path(__file__).resolve().parents[2]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_value_is_summed_in_float32(dtype):
    """Native half kernels: the value is read in `dtype`, locations and weights in float32, and
    everything is summed in float32, so the result is the float32 computation on the same
    (rounded) value, rounded once at the end."""
    value, shapes, starts, locations, weights = make_problem(2, 2, 4, 5, 2, dtype=torch.float32)
    low = value.to(dtype)
    expected = ms_deform_attn(low.float(), shapes, starts, locations, weights)
    actual = ms_deform_attn(low, shapes, starts, locations, weights)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected.to(dtype), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_match_float64_reference(dtype):
    value, shapes, starts, locations, weights = make_problem(2, 4, 8, 6, 4, dtype=torch.float32)
    value = value.to(dtype).requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    grad_output = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad(
        ms_deform_attn(value, shapes, starts, locations, weights), [value, locations, weights], grad_output
    )
    leaves = [t.detach().double().requires_grad_(True) for t in (value, locations, weights)]
    expected = torch.autograd.grad(
        ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2]), leaves, grad_output.double()
    )
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grads[0].double(), expected[0], rtol=eps, atol=4 * eps)  # rounded once
    torch.testing.assert_close(grads[1].double(), expected[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[2].double(), expected[2], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_empty_query_set():
    value, shapes, starts, locations, weights = make_problem(2, 2, 3, 0, 2)
    assert ms_deform_attn(value, shapes, starts, locations, weights).shape == (2, 0, 6)


@needs_kernel
def test_inconsistent_level_layout_is_reported():
    value, shapes, starts, locations, weights = make_problem(1, 1, 2, 3, 1)
    with pytest.raises(RuntimeError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts + 1, locations, weights)
    with pytest.raises(RuntimeError, match="tokens"):
        ms_deform_attn(value[:, :-1], shapes, starts, locations, weights)
    # a level of height 0 where the starts and the total still agree
    value, _, _, locations, weights = make_problem(1, 1, 2, 3, 1, levels=[(3, 4), (2, 2)])
    with pytest.raises(RuntimeError, match="level 1 has an empty spatial shape"):
        ms_deform_attn(value[:, :12], torch.tensor([[3, 4], [0, 5]]), torch.tensor([0, 12]), locations, weights)


@needs_kernel
def test_backward_checks_grad_output():
    """The backward op itself (not only autograd) rejects a grad_output that is not the
    forward's output: same number of elements but another shape, or another dtype. (Another
    device cannot reach the CPU kernel through the dispatcher; the CUDA entry point's check is
    tested in test_cuda_kernels_on_host.py.)"""
    inputs = make_problem(1, 2, 4, 3, 2, dtype=torch.float32)
    backward = torch.ops.di_maskdino.ms_deform_attn_backward
    good = torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match="grad_output must have the shape"):
        backward(good.view(1, 24), *inputs)
    with pytest.raises(RuntimeError, match="grad_output must have the dtype"):
        backward(good.double(), *inputs)


@needs_kernel
def test_backward_fake_kernel_matches_real_strides():
    """The backward returns contiguous gradients for permuted inputs, and so must its fake
    kernel (what torch.compile plans memory with); opcheck compares the two."""
    value, shapes, starts, locations, weights = make_problem(2, 2, 3, 4, 2, dtype=torch.float32)
    permuted_value = value.transpose(1, 2).contiguous().transpose(1, 2)
    permuted_locations = locations.transpose(0, 1).contiguous().transpose(0, 1)
    args = (torch.randn(2, 4, 6), permuted_value, shapes, starts, permuted_locations, weights)
    assert all(g.is_contiguous() for g in torch.ops.di_maskdino.ms_deform_attn_backward(*args))
    torch.library.opcheck(torch.ops.di_maskdino.ms_deform_attn_backward.default, args)


def test_bad_shapes_are_reported():
    value, shapes, starts, locations, weights = make_problem(1, 2, 2, 3, 1)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, starts, locations, weights[..., :1, :])
    with pytest.raises(ValueError, match="number of heads"):
        ms_deform_attn(value[:, :, :1], shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes[:2], starts, locations, weights)


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(msda_module, "_C", None)
    monkeypatch.setattr(msda_module, "_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(msda_module, "_UNAVAILABLE", "the compiled extension di_maskdino._C is not built")
    monkeypatch.setattr(msda_module, "_fallback_announced", False)
    inputs = make_problem(2, 2, 3, 4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "not built" in messages[0]
    torch.testing.assert_close(first, ms_deform_attn_reference(*inputs), rtol=0, atol=0)

"""The multi-scale deformable attention operator against its grid_sample reference."""
import importlib
import warnings

import pytest
import torch

from di_maskdino.ops import kernel_available, ms_deform_attn, ms_deform_attn_reference

# the module (its name is shadowed in di_maskdino.ops by the function it defines)
msda_module = importlib.import_module("di_maskdino.ops.ms_deform_attn")

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.device("cpu")),
    reason=f"the compiled CPU kernel is not available ({msda_module.extension_status()})",
)
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernel_available(torch.device("cuda"))),
    reason="needs a visible GPU and di_maskdino._C built with CUDA (FORCE_CUDA=1)",
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
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype):
    inputs = make_problem(2, 2, 4, 5, 2, dtype=torch.float32)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    expected = ms_deform_attn(*[t.float() if t.is_floating_point() else t for t in low])
    actual = ms_deform_attn(*low)
    assert actual.dtype == dtype
    # Only the final rounding to `dtype` separates the two.
    torch.testing.assert_close(actual, expected.to(dtype), rtol=0, atol=0)


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


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    inputs = list(make_problem(2, 8, 8, 33, 4, dtype=dtype))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-10)
    cpu = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    gpu = [t.cuda().requires_grad_(t.is_floating_point()) for t in inputs]
    out_cpu, out_gpu = ms_deform_attn(*cpu), ms_deform_attn(*gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tolerance)
    grad = torch.randn_like(out_cpu)
    grads_cpu = torch.autograd.grad(out_cpu, [cpu[0], cpu[3], cpu[4]], grad)
    grads_gpu = torch.autograd.grad(out_gpu, [gpu[0], gpu[3], gpu[4]], grad.cuda())
    for a, e in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), e, **tolerance)

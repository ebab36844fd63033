"""The CUDA kernels on a GPU, against the CPU kernel and the float64 reference. Skipped without
a GPU and a CUDA build (FORCE_CUDA=1); dev/gpu_check.sh runs them. Their logic is also
checked without a GPU in test_cuda_kernels_on_host.py."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from di_maskdino.ops import kernel_available, ms_deform_attn, ms_deform_attn_reference

from .test_ms_deform_attn import make_problem

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernel_available(torch.device("cuda"))),
    reason="needs a visible GPU and di_maskdino._C built with CUDA (FORCE_CUDA=1)",
)

ROOT = Path(__file__).resolve().parents[2]
# (problem, levels): the model's shape with a grid-stride loop, and odd sizes
PROBLEMS = {
    "model_shape": dict(batch=2, heads=8, channels=32, queries=333, points=4),
    "odd": dict(batch=1, heads=1, channels=33, queries=77, points=3, levels=[(7, 5), (3, 4), (2, 2)]),
    "5_channels": dict(batch=3, heads=8, channels=5, queries=21, points=1),
}
TOLERANCE = {
    torch.float64: dict(rtol=0, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=3e-5),
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
}
ACC_TOLERANCE = {
    torch.float64: dict(rtol=0, atol=1e-9),
    **{t: dict(rtol=2e-4, atol=2e-4) for t in (torch.float32, torch.float16, torch.bfloat16)},
}


def op_inputs(problem, dtype, device):
    value, shapes, starts, locations, weights = make_problem(**problem)
    location_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = [value.to(dtype), shapes, starts, locations.to(location_dtype), weights.to(location_dtype)]
    return [t.to(device) for t in tensors]


def forward_and_grads(function, inputs, grad_output):
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    output = function(*leaves)
    grads = torch.autograd.grad(output, [leaves[0], leaves[3], leaves[4]], grad_output.to(output.device, output.dtype))
    return output.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", list(PROBLEMS), ids=str)
def test_cuda_matches_cpu_kernel_and_reference(problem, dtype):
    cpu_inputs = op_inputs(PROBLEMS[problem], dtype, "cpu")
    gpu_inputs = [t.cuda() for t in cpu_inputs]
    output_shape = (
        PROBLEMS[problem]["batch"],
        PROBLEMS[problem]["queries"],
        PROBLEMS[problem]["heads"] * PROBLEMS[problem]["channels"],
    )
    grad_output = torch.randn(output_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gpu_out, gpu_grads = forward_and_grads(ms_deform_attn, gpu_inputs, grad_output)
    cpu_out, cpu_grads = forward_and_grads(ms_deform_attn, cpu_inputs, grad_output)
    ref_out, ref_grads = forward_and_grads(
        ms_deform_attn_reference, [t.double() if t.is_floating_point() else t for t in cpu_inputs], grad_output
    )
    assert gpu_out.dtype == dtype and [g.dtype for g in gpu_grads] == [
        t.dtype for t in (gpu_inputs[0], gpu_inputs[3], gpu_inputs[4])
    ]
    for oracle_out, oracle_grads in ((cpu_out, cpu_grads), (ref_out, ref_grads)):
        torch.testing.assert_close(gpu_out.cpu().double(), oracle_out.double(), **TOLERANCE[dtype])
        for actual, expected, tolerance in zip(
            gpu_grads, oracle_grads, (TOLERANCE[dtype], ACC_TOLERANCE[dtype], ACC_TOLERANCE[dtype])
        ):
            torch.testing.assert_close(actual.cpu().double(), expected.double(), **tolerance)


def test_gradcheck_float64():
    value, shapes, starts, _, weights = make_problem(2, 2, 3, 3, 2, levels=[(4, 3), (2, 5)])
    locations = (
        torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    )
    args = [
        value.cuda().requires_grad_(),
        shapes.cuda(),
        starts.cuda(),
        locations.cuda().requires_grad_(),
        weights.cuda().requires_grad_(),
    ]
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(dtype):
    inputs = op_inputs(dict(batch=2, heads=2, channels=8, queries=4, points=2), dtype, "cuda")
    for index in (0, 3, 4):
        inputs[index].requires_grad_(True)
    torch.library.opcheck(torch.ops.di_maskdino.ms_deform_attn_forward.default, inputs)
    grad = torch.randn(2, 4, 16, device="cuda", dtype=dtype)
    permuted = inputs[0].detach().transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(
        torch.ops.di_maskdino.ms_deform_attn_backward.default, (grad, permuted, *[t.detach() for t in inputs[1:]])
    )


def test_compile_fullgraph_matches_eager():
    inputs = op_inputs(PROBLEMS["model_shape"], torch.float32, "cuda")
    compiled = torch.compile(ms_deform_attn, fullgraph=True)
    grad_output = torch.randn(2, 333, 256, device="cuda")
    eager_out, eager_grads = forward_and_grads(ms_deform_attn, inputs, grad_output)
    compiled_out, compiled_grads = forward_and_grads(compiled, inputs, grad_output)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for actual, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_the_second_device():
    cpu_inputs = op_inputs(PROBLEMS["model_shape"], torch.float32, "cpu")
    inputs = [t.to("cuda:1") for t in cpu_inputs]
    grad_output = torch.randn(2, 333, 256, generator=torch.Generator().manual_seed(1))
    torch.cuda.set_device(0)
    output, grads = forward_and_grads(ms_deform_attn, inputs, grad_output)
    assert torch.cuda.current_device() == 0
    assert output.device == torch.device("cuda:1") and all(g.device == torch.device("cuda:1") for g in grads)
    expected_out, expected_grads = forward_and_grads(ms_deform_attn, cpu_inputs, grad_output)
    torch.testing.assert_close(output.cpu(), expected_out, rtol=1e-5, atol=3e-5)
    for actual, expected in zip(grads, expected_grads):
        torch.testing.assert_close(actual.cpu(), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic_mode_gives_identical_gradients(dtype):
    inputs = op_inputs(PROBLEMS["model_shape"], dtype, "cuda")
    grad_output = torch.randn(2, 333, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [forward_and_grads(ms_deform_attn, inputs, grad_output)[1] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    _, expected = forward_and_grads(ms_deform_attn, [t.cpu() for t in inputs], grad_output)
    for actual, wanted, tolerance in zip(
        runs[0], expected, (TOLERANCE[dtype], ACC_TOLERANCE[dtype], ACC_TOLERANCE[dtype])
    ):
        torch.testing.assert_close(actual.cpu().double(), wanted.double(), **tolerance)


def test_large_grid_against_cpu():
    """More query-heads than the GPU holds blocks for: the grid-stride loops iterate."""
    problem = dict(batch=1, heads=8, channels=32, queries=40000, points=4)
    cpu_inputs = op_inputs(problem, torch.float32, "cpu")
    grad_output = torch.randn(1, 40000, 256, generator=torch.Generator().manual_seed(1))
    gpu_out, gpu_grads = forward_and_grads(ms_deform_attn, [t.cuda() for t in cpu_inputs], grad_output)
    cpu_out, cpu_grads = forward_and_grads(ms_deform_attn, cpu_inputs, grad_output)
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-5, atol=3e-5)
    for actual, expected in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(actual.cpu(), expected, rtol=2e-4, atol=2e-4)


def test_grad_output_on_another_device_is_rejected():
    inputs = op_inputs(dict(batch=1, heads=2, channels=4, queries=3, points=2), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="grad_output must be on the device"):
        torch.ops.di_maskdino.ms_deform_attn_backward(torch.zeros(1, 3, 8), *inputs)


@pytest.mark.parametrize("fault", ["start", "empty_level"])
def test_bad_level_layout_stops_the_stream(fault):
    """A layout that does not describe value cannot be checked on the host without a sync; the
    device check stops the stream with a device-side assert (the process's CUDA context is
    then unusable, hence the subprocess)."""
    setup = {
        "start": "starts = starts + 1",
        "empty_level": "shapes = torch.tensor([[3, 4], [0, 5]], device='cuda'); value = value[:, :12]",
    }[fault]
    code = textwrap.dedent(
        f"""
        import torch
        from di_maskdino.ops import ms_deform_attn
        from tests.ops.test_ms_deform_attn import make_problem
        problem = make_problem(1, 2, 4, 3, 2, levels=[(3, 4), (2, 2)], dtype=torch.float32)
        value, shapes, starts, locations, weights = [t.cuda() for t in problem]
        {setup}
        ms_deform_attn(value, shapes, starts, locations, weights)
        torch.cuda.synchronize()
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "device-side assert" in completed.stderr or "device-side assert" in completed.stdout
    expected = {"start": "level_start_index does not match", "empty_level": "has an empty level"}[fault]
    assert expected in completed.stdout + completed.stderr


def test_layer_under_autocast_float16():
    pytest.importorskip("fvcore")  # di_maskdino.layers needs it
    from di_maskdino.layers import MSDeformAttn

    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=256, num_levels=4, num_heads=8, num_points=4).cuda()
    value, shapes, starts, _, _ = make_problem(2, 8, 32, 1, 4, dtype=torch.float32)
    value = value.view(2, -1, 256).cuda()
    query = torch.randn(2, 50, 256, device="cuda")
    reference = torch.rand(2, 50, 4, 2, device="cuda")
    expected = layer(query, reference, value, shapes.cuda(), starts.cuda())
    with torch.autocast("cuda", dtype=torch.float16):
        output = layer(query, reference, value, shapes.cuda(), starts.cuda())
    assert output.dtype == torch.float16
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.05)

"""The CUDA entry points and kernels (csrc/cuda/), run on the CPU under the host simulation of
CUDA threads (csrc/host_sim/), against the float64 grid_sample reference.

No GPU is needed: the very source nvcc compiles is compiled for the host, every launch runs
its blocks on simulated threads whose warps exchange real values at every shuffle, and a
misuse of the warp primitives fails the test instead of passing by luck. So these tests
check, on every change, the CUDA code's indexing, lane groups, vector loads, grid-stride
loops, warp reductions, argument checks and the deterministic backward. Grids are capped at
one or two blocks ("resident blocks") so that the grid-stride loops iterate, and the last
iteration leaves some lane groups without work.
"""

import pytest
import torch

from di_maskdino.ops import ms_deform_attn_reference

from .cuda_host_sim import load_host_sim
from .test_ms_deform_attn import make_problem

LEVELS_3 = [(7, 5), (3, 4), (2, 2)]


@pytest.fixture(scope="module")
def sim():
    module = load_host_sim()
    module.set_grid_cap(2)
    module.reset()
    yield module
    module.set_grid_cap(1 << 20)


def kernel_inputs(value, shapes, starts, locations, weights, dtype):
    """The op's contract: value in `dtype`, locations and weights in its accumulation type."""
    location_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return value.to(dtype), shapes, starts, locations.to(location_dtype), weights.to(location_dtype)


def reference_with_grads(inputs, grad_output):
    """Forward and the three gradients of the float64 reference on the kernel's (rounded) inputs."""
    value, shapes, starts, locations, weights = (t.double() if t.is_floating_point() else t for t in inputs)
    leaves = [value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()]
    output = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    grads = torch.autograd.grad(output, leaves, grad_output.double())
    return output.detach(), grads


TOLERANCE = {
    torch.float64: dict(rtol=0, atol=1e-11),
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    # outputs and the value gradient are rounded to the half type once, from float32 sums
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
}
# location and weight gradients stay in float32: only the summation order differs
ACC_TOLERANCE = {
    torch.float64: dict(rtol=0, atol=1e-10),
    **{t: dict(rtol=1e-4, atol=1e-4) for t in (torch.float32, torch.float16, torch.bfloat16)},
}

# (problem, expected variant of the kernels for float32)
CASES = {
    # the model's shape (L = P = 4, compiled in); 32 channels: V = 4, groups of 8 lanes
    "model_shape_8_heads": (dict(batch=2, heads=8, channels=32, queries=9, points=4), "V=4 group=8 levels=4 points=4"),
    # C = 33, one head: V = 1, a whole warp per query-head, lane 0 takes a second chunk
    "33_channels_1_head": (
        dict(batch=1, heads=1, channels=33, queries=13, points=3, levels=LEVELS_3),
        "V=1 group=32 levels=0 points=0",
    ),
    # C = 5: groups of 8 lanes, three without channels
    "5_channels_8_heads": (dict(batch=3, heads=8, channels=5, queries=7, points=1), "V=1 group=8 levels=0 points=0"),
    # C = 12: V = 4 and groups of 4 lanes, one idle
    "12_channels": (
        dict(batch=2, heads=2, channels=12, queries=11, points=2, levels=LEVELS_3),
        "V=4 group=4 levels=0 points=0",
    ),
    # 3 heads x 7 queries = 21 query-heads for groups of 8 lanes (4 a warp): the last warp has
    # lane groups without a query-head, which must still join the shuffles
    "partial_warp": (dict(batch=1, heads=3, channels=20, queries=7, points=4), "V=4 group=8 levels=4 points=4"),
    # C = 1: groups of one lane, no shuffles at all
    "1_channel": (dict(batch=2, heads=8, channels=1, queries=5, points=4), "V=1 group=1 levels=4 points=4"),
}


def grad_output_for(output_shape, dtype, seed=1):
    return torch.randn(output_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_forward_and_gradients_match_float64_reference(sim, case, dtype):
    problem, float32_variant = CASES[case]
    inputs = kernel_inputs(*make_problem(**problem), dtype=dtype)
    batch, queries, heads, channels = problem["batch"], problem["queries"], problem["heads"], problem["channels"]
    grad_output = grad_output_for((batch, queries, heads * channels), dtype)
    expected, expected_grads = reference_with_grads(inputs, grad_output)

    sim.reset()
    output = sim.forward(*inputs)
    grads = sim.backward(grad_output, *inputs)
    launches = sim.launches()

    assert output.dtype == dtype and output.shape == expected.shape
    torch.testing.assert_close(output.double(), expected, **TOLERANCE[dtype])
    for name, actual, wanted, input_, tolerance in zip(
        ("value", "sampling_locations", "attention_weights"),
        grads,
        expected_grads,
        (inputs[0], inputs[3], inputs[4]),
        (TOLERANCE[dtype], ACC_TOLERANCE[dtype], ACC_TOLERANCE[dtype]),
    ):
        assert actual.dtype == input_.dtype and actual.shape == input_.shape
        torch.testing.assert_close(
            actual.double(), wanted, **tolerance, msg=lambda m, name=name: f"grad of {name}: {m}"
        )

    # the variants and grids the test means to exercise
    kernels = {description.split()[0]: (description, blocks) for description, blocks, _ in launches}
    assert set(kernels) == {"check_level_layout", "forward", "backward"}
    if dtype == torch.float32:
        assert kernels["forward"][0] == "forward " + float32_variant
        assert kernels["backward"][0] == "backward " + float32_variant
    query_heads = batch * queries * heads
    group = int(kernels["backward"][0].split("group=")[1].split()[0])
    warps_needed = -(-query_heads // (32 // group))
    assert kernels["backward"][1] == min(2, -(-warps_needed // 8))
    if warps_needed > 16:  # more warps than the two capped blocks hold: the grid-stride loop iterates
        assert kernels["backward"][1] == 2


def test_vector_loads_fall_back_on_misaligned_value(sim):
    """A value view that starts one element into its storage cannot be read 16 bytes at a time."""
    value, shapes, starts, locations, weights = make_problem(2, 2, 8, 5, 2, dtype=torch.float32)
    shifted = torch.cat([value.new_zeros(1), value.flatten()])[1:].view(value.shape)
    assert shifted.data_ptr() % 16 != 0
    sim.reset()
    output = sim.forward(shifted, shapes, starts, locations, weights)
    assert sim.launches()[-1][0].startswith("forward V=1 ")
    torch.testing.assert_close(
        output, ms_deform_attn_reference(value, shapes, starts, locations, weights), rtol=1e-5, atol=1e-5
    )


def test_deterministic_backward_uses_no_atomics(sim):
    """Under torch.use_deterministic_algorithms the value gradient is summed per value row in a
    fixed order (sort by row), without a single atomic addition, and still matches."""
    problem = dict(batch=2, heads=8, channels=8, queries=9, points=4)
    inputs = kernel_inputs(*make_problem(**problem), dtype=torch.float32)
    grad_output = grad_output_for((2, 9, 64), torch.float32)
    _, expected = reference_with_grads(inputs, grad_output)

    sim.reset()
    atomic = sim.backward(grad_output, *inputs)
    assert sim.atomic_adds() > 0

    sim.reset()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = sim.backward(grad_output, *inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert sim.atomic_adds() == 0
    assert [d.split()[0] for d, _, _ in sim.launches()] == [
        "check_level_layout",
        "backward",
        "corner_rows",
        "value_grad_from_sorted",
    ]
    for actual, wanted, tolerance in zip(
        deterministic, expected, (TOLERANCE[torch.float32], ACC_TOLERANCE[torch.float32], ACC_TOLERANCE[torch.float32])
    ):
        torch.testing.assert_close(actual.double(), wanted, **tolerance)
    torch.testing.assert_close(deterministic[1], atomic[1], rtol=0, atol=0)  # same kernel, same order


@pytest.mark.parametrize(
    "fault, message",
    [
        ("start", "level_start_index does not match"),
        ("total", "do not add up to value.size"),
        ("empty_level", "has an empty level"),
    ],
)
@pytest.mark.parametrize("entry", ["forward", "backward"])
def test_bad_level_layout_stops_before_sampling(sim, entry, fault, message):
    value, shapes, starts, locations, weights = make_problem(
        1, 2, 4, 3, 2, levels=[(3, 4), (2, 2)], dtype=torch.float32
    )
    if fault == "start":
        starts = starts + 1
    elif fault == "total":
        value = value[:, :-1]
    else:  # a level of height 0 placed so that the starts and the total still agree
        shapes = torch.tensor([[3, 4], [0, 5]])
        value = value[:, :12]
    sim.reset()
    with pytest.raises(RuntimeError, match=message):
        if entry == "forward":
            sim.forward(value, shapes, starts, locations, weights)
        else:
            sim.backward(torch.zeros(1, 3, 8), value, shapes, starts, locations, weights)
    # the check ran first and nothing sampled value with the bad layout
    assert [d.split()[0] for d, _, _ in sim.launches()] == ["check_level_layout"]


def test_backward_checks_grad_output(sim):
    inputs = make_problem(1, 2, 4, 3, 2, dtype=torch.float32)
    good = torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match="grad_output must have the shape"):
        sim.backward(good.view(1, 24), *inputs)
    with pytest.raises(RuntimeError, match="grad_output must have the shape"):
        sim.backward(torch.zeros(1, 3, 9), *inputs)
    with pytest.raises(RuntimeError, match="grad_output must have the dtype"):
        sim.backward(good.double(), *inputs)
    with pytest.raises(RuntimeError, match="grad_output must be on the device"):
        sim.backward(good.to("meta"), *inputs)


def test_gradients_are_contiguous_for_permuted_inputs(sim):
    value, shapes, starts, locations, weights = make_problem(2, 2, 4, 3, 2, dtype=torch.float32)
    permuted_value = value.transpose(1, 2).contiguous().transpose(1, 2)
    permuted_locations = locations.transpose(0, 1).contiguous().transpose(0, 1)
    grads = sim.backward(torch.ones(2, 3, 8), permuted_value, shapes, starts, permuted_locations, weights)
    assert all(g.is_contiguous() for g in grads)
    expected = sim.backward(torch.ones(2, 3, 8), value, shapes, starts, locations, weights)
    for actual, wanted in zip(grads, expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


def test_empty_problems(sim):
    value, shapes, starts, locations, weights = make_problem(2, 2, 4, 0, 2, dtype=torch.float32)
    assert sim.forward(value, shapes, starts, locations, weights).shape == (2, 0, 8)
    grads = sim.backward(torch.zeros(2, 0, 8), value, shapes, starts, locations, weights)
    assert [tuple(g.shape) for g in grads] == [tuple(value.shape), tuple(locations.shape), tuple(weights.shape)]
    assert not grads[0].any()


# ---- the simulation itself ----


def cuda_shuffle(op, values, argument, width):
    """CUDA's definition of the shuffles (CUDA C++ Programming Guide, warp shuffle functions),
    written out per lane for one warp."""
    result = []
    for lane in range(32):
        segment = lane // width * width
        if op == "xor":
            source = lane ^ argument
            source = lane if source // width > lane // width else source
        elif op == "down":
            source = lane if lane % width + argument >= width else lane + argument
        elif op == "up":
            source = lane if lane % width - argument < 0 else lane - argument
        else:
            source = segment + argument % width
        result.append(values[source])
    return result


@pytest.mark.parametrize(
    "op, argument, width",
    [
        ("xor", 1, 32),
        ("xor", 16, 32),
        ("xor", 5, 8),
        ("xor", 4, 4),
        ("down", 1, 32),
        ("down", 3, 8),
        ("up", 2, 32),
        ("up", 5, 16),
        ("index", 7, 32),
        ("index", 9, 8),
    ],
)
def test_shuffles_exchange_lane_values_as_cuda_defines(sim, op, argument, width):
    threads, blocks = 64, 2
    values = torch.arange(blocks * threads, dtype=torch.float32) * 1.5 + 0.25
    out = sim.shuffle(["xor", "down", "up", "index"].index(op), values, argument, width, threads)
    expected = []
    for warp in range(blocks * threads // 32):
        expected += cuda_shuffle(op, values[32 * warp : 32 * warp + 32].tolist(), argument, width)
    assert out.tolist() == expected


@pytest.mark.parametrize(
    "kind, message",
    [
        (0, "has returned \\(divergent warp primitive\\)"),
        (1, "the mask does not name the calling lane"),
        (2, "which is not in the mask"),
        (3, "instead \\(divergent warp primitive\\)"),
        (4, "selftest: thread 5 fails its check"),
    ],
)
def test_misuse_of_warp_primitives_is_reported(sim, kind, message):
    with pytest.raises(RuntimeError, match=message):
        sim.misuse(kind)

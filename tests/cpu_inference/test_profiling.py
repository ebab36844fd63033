"""time_by_kind: a forward's CPU time split into matrix products, deformable attention, rest."""

import time

import torch

from di_maskdino.cpu_inference.profiling import time_by_kind
from di_maskdino.ops import kernel_available, ms_deform_attn


def test_a_matrix_product_alone_is_all_matrix_time():
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    kinds = time_by_kind(lambda: [a @ b for _ in range(4)])
    assert kinds["deformable attention"] == 0.0
    assert kinds["matrix products"] > 0.9 * sum(kinds.values())


def test_a_convolution_alone_is_all_matrix_time():
    conv, image = torch.nn.Conv2d(32, 32, 3, padding=1), torch.randn(1, 32, 64, 64)
    with torch.no_grad():
        kinds = time_by_kind(lambda: [conv(image) for _ in range(4)])
    assert kinds["matrix products"] > 0.8 * sum(kinds.values()), kinds


def test_elementwise_work_is_other():
    x = torch.randn(2**20)
    kinds = time_by_kind(lambda: [x.exp().sin() for _ in range(4)])
    assert kinds["matrix products"] == 0.0 and kinds["deformable attention"] == 0.0
    assert kinds["other"] > 0.0


def test_kinds_add_up_to_the_profiled_call():
    """A linear layer (addmm: matrix), a convolution (matrix), a ReLU and a sum (other), and the
    deformable attention operator (when compiled; else its reference is other work): each kind
    is present, and together they are no more than the call's wall time (self times partition
    it; the profiler's overhead is extra)."""
    linear, conv = torch.nn.Linear(256, 256), torch.nn.Conv2d(16, 16, 3, padding=1)
    x, image = torch.randn(4096, 256), torch.randn(1, 16, 64, 64)
    shapes = torch.tensor([[16, 16], [8, 8]])
    starts = torch.tensor([0, 256])
    value = torch.randn(1, 320, 2, 8)
    locations = torch.rand(1, 100, 2, 2, 4, 2)
    weights = torch.softmax(torch.randn(1, 100, 2, 8), -1).view(1, 100, 2, 2, 4)

    def forward():
        torch.relu(linear(x)).sum()
        conv(image)
        ms_deform_attn(value, shapes, starts, locations, weights)

    forward()
    start = time.perf_counter()
    with torch.no_grad():
        kinds = time_by_kind(forward)
    wall = time.perf_counter() - start
    assert kinds["matrix products"] > 0 and kinds["other"] > 0, kinds
    assert (kinds["deformable attention"] > 0) == kernel_available(torch.device("cpu")), kinds
    assert sum(kinds.values()) <= wall

"""torch.compile on the CUDA dispatch path, checked without a GPU: Dynamo traces the operator
and the MSDeformAttn layer on fake CUDA tensors (FakeTensorMode needs no device), so the
Python that runs on a GPU - the kernel choice in `ms_deform_attn`, the fake kernels - is
traced exactly as it would be there."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from di_maskdino.ops import kernel_available, ms_deform_attn

from .test_ms_deform_attn import make_problem

msda_module = importlib.import_module("di_maskdino.ops.ms_deform_attn")

needs_kernel = pytest.mark.skipif(not kernel_available(torch.device("cpu")), reason="needs the compiled extension")


class GraphCapture:
    """A torch.compile backend that keeps the graphs Dynamo hands it and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def targets(self):
        return [str(node.target) for graph in self.graphs for node in graph.graph.nodes if node.op == "call_function"]


@pytest.fixture
def cuda_kernels_compiled(monkeypatch):
    """Makes this installation look like a build with the CUDA kernels (as on a GPU machine):
    the fake kernels then stand in for them on fake CUDA tensors."""
    monkeypatch.setattr(msda_module, "_KERNEL_DEVICE_TYPES", frozenset({"cpu", "cuda"}), raising=False)


def fake_cuda(mode, tensors):
    """Fake copies on the CUDA device; call inside `with mode:`."""
    return [mode.from_tensor(t).to("cuda") for t in tensors]


OP = "di_maskdino.ms_deform_attn_forward"


@needs_kernel
def test_operator_traces_in_one_graph_on_cuda_tensors(cuda_kernels_compiled):
    capture = GraphCapture()
    compiled = torch.compile(ms_deform_attn, backend=capture, fullgraph=True)
    mode = FakeTensorMode()
    problem = make_problem(2, 4, 8, 5, 2, dtype=torch.float32)
    with mode:
        output = compiled(*fake_cuda(mode, problem))
    assert output.device.type == "cuda" and output.shape == (2, 5, 32)
    assert len(capture.graphs) == 1
    assert capture.targets().count(OP) == 1


@needs_kernel
def test_half_value_reaches_the_kernel_as_half_on_cuda(cuda_kernels_compiled):
    """The op gets the float16 value itself (no float32 copy) and float32 locations / weights."""
    capture = GraphCapture()
    compiled = torch.compile(ms_deform_attn, backend=capture, fullgraph=True)
    mode = FakeTensorMode()
    problem = make_problem(2, 4, 8, 5, 2, dtype=torch.float32)
    with mode:
        value, shapes, starts, locations, weights = fake_cuda(mode, problem)
        output = compiled(value.half(), shapes, starts, locations.half(), weights)
    assert output.dtype == torch.float16
    (call,) = [n for g in capture.graphs for n in g.graph.nodes if str(n.target) == OP]
    dtypes = [arg.meta["example_value"].dtype for arg in call.args]
    assert dtypes == [torch.float16, torch.int64, torch.int64, torch.float32, torch.float32]


@needs_kernel
def test_layer_traces_in_one_graph_on_cuda_tensors(cuda_kernels_compiled):
    pytest.importorskip("fvcore")  # di_maskdino.layers needs it
    from di_maskdino.layers import MSDeformAttn

    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=32, num_levels=2, num_heads=4, num_points=2)
    capture = GraphCapture()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        layer = layer.to("cuda")
        query = torch.randn(2, 5, 32, device="cuda")
        reference = torch.rand(2, 5, 2, 2, device="cuda")
        value = torch.randn(2, 30, 32, device="cuda")
        shapes = torch.tensor([[4, 6], [2, 3]], device="cuda")
        starts = torch.tensor([0, 24], device="cuda")
        output = torch.compile(layer, backend=capture, fullgraph=True)(query, reference, value, shapes, starts)
    assert output.device.type == "cuda" and output.shape == (2, 5, 32)
    assert len(capture.graphs) == 1
    assert capture.targets().count(OP) == 1
    assert "torch.nn.functional.grid_sample" not in capture.targets()  # not the reference path


def test_kernel_available_is_decided_at_import():
    """No call into the extension at trace time: the answer is a constant set."""
    assert isinstance(msda_module._KERNEL_DEVICE_TYPES, frozenset)
    assert kernel_available(torch.device("cuda")) == ("cuda" in msda_module._KERNEL_DEVICE_TYPES)

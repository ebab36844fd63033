"""Gradient accumulation (SOLVER.ACCUMULATION_STEPS): k micro-batches of b images give the
gradient of one batch of k x b images (float64), with one process and with two, and one
optimizer step then gives the same weights.

The oracle runs the same images as one batch. Two things would differ otherwise and are
made equal: random draws (the mask losses' point sampling and the matcher's points) come
from a torch function mode that gives every row of a draw the same fixed numbers, so that a
mask gets the same points in either batching; denoising queries are off (their groups
depend on the batch's largest object count and their noise on the draw order)."""

import itertools
import socket

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see INSTALL.md)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from di_maskdino.d2 import ConfigError, load_config  # noqa: E402
from di_maskdino.d2.engine.train_step import TrainStep  # noqa: E402
from tests.tooling import QUICK  # noqa: E402

SETTING = ["MODEL.DI_MASKDINO.DN.ENABLED", "False", "MODEL.DI_MASKDINO.LOSS.TRAIN_NUM_POINTS", "64"]


class FixedRandom(TorchFunctionMode):
    """torch.rand / rand_like give fixed numbers in [0, 1) that depend only on the position
    within the last two dimensions: every row of a draw is the same."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.rand:
            size = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
            return fixed(size, kwargs.get("dtype") or torch.get_default_dtype(), kwargs.get("device"))
        if func is torch.rand_like:
            return fixed(tuple(args[0].shape), kwargs.get("dtype") or args[0].dtype, args[0].device)
        return func(*args, **kwargs)


def fixed(size, dtype, device):
    rows, columns = (size[-2], size[-1]) if len(size) >= 2 else (1, size[-1])
    values = (torch.arange(rows * columns, dtype=torch.float64) * 0.6180339887 + 0.1).remainder(1.0)
    return values.view(rows, columns).to(dtype=dtype, device=device).expand(size).contiguous()


def image_with_objects(seed: int):
    """A 64 x 64 input with two rectangles (every image has the same object count)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)
    boxes, masks = [], []
    for k in range(2):
        x0, y0 = (int(v) for v in torch.randint(0, 30, (2,), generator=generator))
        w, h = (int(v) for v in torch.randint(10, 30, (2,), generator=generator))
        mask = torch.zeros(64, 64, dtype=torch.bool)
        mask[y0 : y0 + h, x0 : x0 + w] = True
        image[:, y0 : y0 + h, x0 : x0 + w] = 60 + 90 * k
        boxes.append([x0, y0, x0 + w, y0 + h])
        masks.append(mask)
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor([seed % 3, (seed + 1) % 3])
    instances.gt_masks = BitMasks(torch.stack(masks))
    return {"image": image, "instances": instances, "height": 64, "width": 64}


def fresh_model():
    torch.manual_seed(0)
    return build_model(load_config(QUICK, SETTING)).double().train()


def one_step(model, batches, accumulation_steps, lr=0.0):
    """One TrainStep; returns the gradients (copies) and the weights after the step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr) if lr else torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, itertools.cycle(batches), optimizer, accumulation_steps=accumulation_steps)
    with EventStorage(0), FixedRandom():
        step.iter = 0
        step.run_step()
    target = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in target.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in target.named_parameters()}
    return grads, weights


def assert_same(found, expected, rtol=1e-12):
    """Every tensor's relative difference (norm of the difference / norm) below `rtol`;
    returns the largest (printed: the test's figure)."""
    assert found.keys() == expected.keys()
    worst = max(((found[k] - expected[k]).norm() / expected[k].norm().clamp(min=1e-30)).item() for k in expected)
    assert worst < rtol, worst
    print(f"largest relative difference {worst:.2e}")
    return worst


def test_two_micro_batches_give_the_gradient_of_their_batch():
    images = [image_with_objects(seed) for seed in range(4)]
    whole, whole_weights = one_step(fresh_model(), [images], 1, lr=1e-3)
    accumulated, accumulated_weights = one_step(fresh_model(), [images[:2], images[2:]], 2, lr=1e-3)
    assert len(whole) > 100  # every trained parameter got a gradient
    assert_same(accumulated, whole)
    # one AdamW step: the same weights, to float64 rounding (Adam's first step divides each
    # gradient by its own magnitude, so near-zero entries amplify their last-bit differences)
    assert_same(accumulated_weights, whole_weights, rtol=1e-7)
    singles, _ = one_step(fresh_model(), [[image] for image in images], 4)
    assert_same(singles, whole)
    # the normaliser matters: a micro-batch normalised by its own objects is not the big batch
    alone, _ = one_step(fresh_model(), [images[:2]], 1)
    assert not all(torch.allclose(alone[k], whole[k], rtol=1e-3) for k in whole)


def _distributed(rank, world, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        images = [image_with_objects(seed) for seed in range(4)]
        mine = images[rank * 2 : rank * 2 + 2]  # each process: two micro-batches of one image
        model = torch.nn.parallel.DistributedDataParallel(fresh_model(), broadcast_buffers=False)
        grads, _ = one_step(model, [[mine[0]], [mine[1]]], 2)
        results[rank] = {k: v for k, v in grads.items()}
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_accumulating_give_the_gradient_of_the_whole_batch():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed, args=(2, port, results), nprocs=2, join=True)
    whole, _ = one_step(fresh_model(), [[image_with_objects(seed) for seed in range(4)]], 1)
    for rank in (0, 1):
        assert_same(dict(results[rank]), whole)


def test_bad_accumulation_settings_are_refused():
    with pytest.raises(ConfigError, match="SOLVER.ACCUMULATION_STEPS = 0: must be at least 1"):
        load_config(QUICK, ["SOLVER.ACCUMULATION_STEPS", "0"])
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH = 4: must be divisible by SOLVER.ACCUMULATION_STEPS"):
        load_config(QUICK, ["SOLVER.ACCUMULATION_STEPS", "3"])
    with pytest.raises(ValueError, match="at least 1"):
        TrainStep(
            torch.nn.Linear(1, 1), [], torch.optim.SGD([torch.zeros(1, requires_grad=True)]), accumulation_steps=0
        )

#!/usr/bin/env python
"""The model-level stages of dev/gpu_check.sh: inference speed of a configuration in float32
and under AMP, and a short AMP training on synthetic data with its peak memory.

    python dev/gpu_model_check.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --device cuda

inference   images per second of `model([{"image", "height", "width"}])` in eval mode, one
            image of --input-size per call, end to end (normalisation, padding, network and
            post-processing to instances), median over --fps-repeats calls after warm-up;
            in float32, then under torch.autocast (--amp-dtype). The paper reports 7.7 FPS for
            DI-MaskDINO R50 (MaskDINO: 8.0) on an RTX 3090.
training    --train-iters iterations of AdamW on --batch synthetic images of --input-size,
            each with a few random boxes and their rectangle masks, under torch.autocast with
            a GradScaler for float16: first and last total loss (must be finite), median
            seconds per iteration after 5, and the peak memory (torch.cuda.max_memory_allocated
            on a GPU; on a CPU the process's resident-set high-water mark).

It builds the model with what stays stable across refactors: di_maskdino.d2.load_config,
detectron2.modeling.build_model and model(batched_inputs). Random weights (MODEL.WEIGHTS is
ignored): speed and memory do not depend on them. Exit status 1 if a loss is not finite.
"""

import argparse
import resource
import statistics
import sys
import time

import torch

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from di_maskdino.d2 import load_config

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_image(height: int, width: int, generator: torch.Generator, num_classes: int, instances: bool) -> dict:
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    item = {"image": image, "height": height, "width": width}
    if instances:
        count = 6
        x0 = torch.randint(0, width // 2, (count,), generator=generator)
        y0 = torch.randint(0, height // 2, (count,), generator=generator)
        x1 = x0 + torch.randint(8, width // 2, (count,), generator=generator)
        y1 = y0 + torch.randint(8, height // 2, (count,), generator=generator)
        masks = torch.zeros(count, height, width, dtype=torch.bool)
        for i in range(count):
            masks[i, y0[i] : y1[i], x0[i] : x1[i]] = True
        target = Instances((height, width))
        target.gt_boxes = Boxes(torch.stack([x0, y0, x1, y1], 1).float())
        target.gt_classes = torch.randint(0, num_classes, (count,), generator=generator)
        target.gt_masks = BitMasks(masks)
        item["instances"] = target
    return item


def timed_calls(function, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference(model, args, device, amp_dtype) -> None:
    height, width = args.input_size
    item = synthetic_image(height, width, torch.Generator().manual_seed(0), 1, instances=False)
    model.eval()
    for label, autocast in (("float32", False), (f"AMP {args.amp_dtype}", True)):

        def call(autocast=autocast):
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
                model([item])

        seconds = timed_calls(call, device, args.fps_warmup, args.fps_repeats)
        print(
            f"inference {label}: {seconds * 1e3:.1f} ms per image, {1 / seconds:.2f} FPS "
            f"(input {height}x{width}, end to end)"
        )


def training(model, cfg, args, device, amp_dtype) -> int:
    height, width = args.input_size
    generator = torch.Generator().manual_seed(1)
    num_classes = cfg.MODEL.DI_MASKDINO.NUM_CLASSES
    batches = [
        [synthetic_image(height, width, generator, num_classes, instances=True) for _ in range(args.batch)]
        for _ in range(4)
    ]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for iteration in range(args.train_iters):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype):
            loss_dict = model(batches[iteration % len(batches)])
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - start)
    steady = times[5:] or times
    print(
        f"training AMP {args.amp_dtype}: {args.train_iters} iterations of {args.batch} images {height}x{width}, "
        f"{statistics.median(steady):.3f} s per iteration, total loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"peak memory {peak_memory_mib(device):.0f} MiB "
        f"({'CUDA allocated' if device.type == 'cuda' else 'CPU resident set'})"
    )
    if not all(map(torch.isfinite, torch.tensor(losses))):
        print(f"training: non-finite loss in {losses}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input-size", default="800x1333", help="HxW of the synthetic images")
    parser.add_argument(
        "--amp-dtype", default=None, choices=list(AMP_DTYPES), help="default: float16 on a GPU, bfloat16 on a CPU"
    )
    parser.add_argument("--fps-warmup", type=int, default=3)
    parser.add_argument("--fps-repeats", type=int, default=20)
    parser.add_argument("--train-iters", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2, help="images per training iteration (the paper: 2 per GPU)")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    args.input_size = tuple(int(v) for v in args.input_size.split("x"))
    args.amp_dtype = args.amp_dtype or ("float16" if args.device.startswith("cuda") else "bfloat16")

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"config {args.config_file}: {parameters:.1f} M parameters, on {device} ({name}), torch {torch.__version__}")
    amp_dtype = AMP_DTYPES[args.amp_dtype]
    if not args.skip_inference:
        inference(model, args, device, amp_dtype)
    status = 0
    if not args.skip_training:
        status = training(model, cfg, args, device, amp_dtype)
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Size and speed of a DI-MaskDINO configuration (the paper's Params / FLOPs / FPS columns).

    python tools/benchmark_model.py --config-file configs/coco/dimaskdino_r50_12ep.yaml \\
        --input-size 800x1333 --device cuda

Reports parameters (total and per part), FLOPs (fvcore's counter with handles for the
deformable attention op and scaled-dot-product attention; one fused multiply-add = one
flop), and the median over --repeats runs, after --warmup runs, of
  model time   backbone + encoder + head on a preprocessed batch (what the paper's FPS counts)
  end to end   preprocessing + model + post-processing to instances at the input size
with FPS = 1 / model time, and peak memory (CUDA: max allocated; CPU: growth of the
process's resident-set high-water mark during the first run). Random input, random
weights unless MODEL.WEIGHTS is given.
"""

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import di_maskdino.d2  # noqa: E402, F401 - first: imports detectron2 without its import-time warnings

# isort: split
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402

from di_maskdino.d2 import Checkpointer, CheckpointError, load_config  # noqa: E402
from di_maskdino.ops import flop_handles  # noqa: E402


class FinalPrediction(torch.nn.Module):
    """The network on a preprocessed batch, returning tensors (for jit tracing)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        final = self.model.run(batch).final
        return final.logits, final.boxes, final.masks


def count_flops(model, batch):
    analysis = FlopCountAnalysis(FinalPrediction(model), (batch,)).set_op_handle(**flop_handles())
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total(), analysis.by_operator(), analysis.unsupported_ops()


def timed(function, device, warmup, repeats):
    def run():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input-size", default="800x1333", help="HxW of the (single) input image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it traces the model once)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; benchmark with --device cpu")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    device = torch.device(args.device)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        try:
            Checkpointer(model, mode="strict", what="MODEL.WEIGHTS").load(cfg.MODEL.WEIGHTS)
        except CheckpointError as error:
            raise SystemExit(str(error)) from error
    height, width = (int(v) for v in args.input_size.split("x"))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)

    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("backbone", "encoder", "head")
    }
    total = sum(p.numel() for p in model.parameters())
    print(f"config {args.config_file}, input {height}x{width}, device {device}, {torch.get_num_threads()} CPU threads")
    print(f"parameters: {total / 1e6:.2f} M (" + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parts.items()) + ")")

    with torch.no_grad():
        batch, _ = model.preprocess([image])
        # peak memory first: any earlier forward (the FLOP trace, warm-up) would set the mark
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model.run(batch)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        if not args.no_flops:
            flops, by_operator, unsupported = count_flops(model, batch)
            top = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in sorted(by_operator.items(), key=lambda kv: -kv[1])[:6])
            print(f"FLOPs: {flops / 1e9:.1f} G  ({top}; G)")
            calls, kinds = sum(unsupported.values()), len(unsupported)
            print(f"  not counted (elementwise and indexing ops): {calls} calls of {kinds} kinds")
        model_time = timed(lambda: model.run(batch), device, args.warmup, args.repeats)
        end_to_end = timed(
            lambda: model([{"image": image, "height": height, "width": width}]), device, args.warmup, args.repeats
        )
    print(f"model time: {model_time * 1e3:.1f} ms ({1 / model_time:.2f} FPS)")
    print(f"end to end with post-processing: {end_to_end * 1e3:.1f} ms")
    measured = "CUDA allocated" if device.type == "cuda" else "CPU resident set growth"
    print(f"peak memory of one forward: {peak:.0f} MiB ({measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

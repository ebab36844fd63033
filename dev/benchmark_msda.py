#!/usr/bin/env python
"""Benchmark of the multi-scale deformable attention kernel against the pure-PyTorch
(grid_sample) reference.

Problems (batch 1, 8 heads x 32 channels, 4 levels, 4 points, 1024 x 1024 image):
    encoder   every token of levels 128x128, 64x64, 32x32, 16x16 queries them all (21,760
              queries); as in the encoder, a query samples every level around its own
              position, here at offsets of about 2 pixels (normal, std 2 px of each level)
    decoder   300 queries at random positions over the same values, sampling within about
              5% of the image around them (normal, std 0.05)

For each problem, implementation and mode (forward, forward+backward) it prints the median
and the fastest time over --repeats runs after --warmup runs, and the peak memory of one
call. Every measurement runs in a fresh subprocess: on the CPU the peak is the growth of the
process's resident-set high-water mark during the first call; on a GPU it is
torch.cuda.max_memory_allocated above what the inputs take. The load average of the machine
is printed with the results (on a shared machine, compare runs taken at the same load).

--dtype is the dtype of the value tensor (what AMP training gives the operator); the kernel
takes locations and weights in float32 (float64 with float64 values), the reference runs
everything in --dtype.

    python dev/benchmark_msda.py                       # CPU, all threads torch uses
    python dev/benchmark_msda.py --device cuda --dtype float16 --json out.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LEVELS = [(128, 128), (64, 64), (32, 32), (16, 16)]
HEADS, CHANNELS, POINTS = 8, 32, 4
PROBLEMS = {"encoder": None, "decoder": 300}  # number of queries; None = one per value token
IMPLEMENTATIONS = ("kernel", "reference")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
GOALS = "goal on the CPU: encoder forward+backward >= 8x faster than the reference, lower peak memory"


def make_inputs(problem: str, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    queries = PROBLEMS[problem] or tokens
    value = torch.randn(1, tokens, HEADS, CHANNELS, generator=generator)
    spread = torch.randn(1, queries, HEADS, len(LEVELS), POINTS, 2, generator=generator)
    if PROBLEMS[problem] is None:
        # reference point of every token: its pixel centre, normalised by its level's size
        centres = []
        for height, width in LEVELS:
            y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
            centres.append(torch.stack([x / width, y / height], -1).reshape(-1, 2))
        reference = torch.cat(centres)[None, :, None, None, None, :]
        pixel = 1.0 / shapes.flip(-1).float()  # (L, 2): one pixel of each level, as (x, y)
        locations = reference + spread * 2.0 * pixel[None, None, None, :, None, :]
    else:
        reference = torch.rand(1, queries, 1, 1, 1, 2, generator=generator)
        locations = reference + spread * 0.05
    weights = torch.rand(1, queries, HEADS, len(LEVELS), POINTS, generator=generator).softmax(-1)
    location_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = [value.to(dtype), shapes, starts, locations.to(location_dtype), weights.to(location_dtype)]
    return [t.to(device) for t in tensors]


def _load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def worker(implementation: str, problem: str, mode: str, device: str, dtype: str, warmup: int, repeats: int) -> dict:
    """One measurement, in this process; returns the result as a dict."""
    from di_maskdino.ops import kernel_available, ms_deform_attn, ms_deform_attn_reference

    device = torch.device(device)
    if implementation == "kernel" and not kernel_available(device):
        raise SystemExit(
            f"no compiled kernel for {device}: build di_maskdino._C first (pip install --no-build-isolation -e .)"
        )
    inputs = make_inputs(problem, device, DTYPES[dtype])
    if implementation == "kernel":
        function = ms_deform_attn
    else:
        for index in (3, 4):
            inputs[index] = inputs[index].to(DTYPES[dtype])
        function = ms_deform_attn_reference
    backward = mode == "forward+backward"
    if backward:
        for index in (0, 3, 4):
            inputs[index].requires_grad_(True)
    grad_output = torch.randn(inputs[3].shape[1], HEADS * CHANNELS, device=device, dtype=DTYPES[dtype])[None]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def call():
        output = function(*inputs)
        if backward:
            output.backward(grad_output)
            for index in (0, 3, 4):
                inputs[index].grad = None
        synchronize()

    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        base = _peak_rss_mib()
        call()
        peak = _peak_rss_mib() - base
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "implementation": implementation,
        "problem": problem,
        "mode": mode,
        "device": str(device),
        "dtype": dtype,
        "queries": int(inputs[3].shape[1]),
        "tokens": int(inputs[0].shape[1]),
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "peak_mib": peak,
    }


def run_in_subprocess(args, implementation, problem, mode) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        implementation,
        problem,
        mode,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"measurement {implementation}/{problem}/{mode} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the value tensor")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "PROBLEM", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.dtype, args.warmup, args.repeats)))
        return

    from di_maskdino.ops import extension_status

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, device {args.device} ({name}), value {args.dtype}; {extension_status()}")
    print(
        f"median (fastest) of {args.repeats} runs after {args.warmup} warm-up runs; "
        "peak = memory of one call above its inputs"
    )
    print(f"load average before: {_load_average()}\n")
    results = [
        run_in_subprocess(args, implementation, problem, mode)
        for problem in args.problems
        for mode in MODES
        for implementation in IMPLEMENTATIONS
    ]
    header = (
        f"{'problem':<9} {'queries':>7} {'mode':<17} {'kernel ms':>17} {'ref ms':>17} {'speed-up':>9} "
        f"{'kernel MiB':>11} {'ref MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for problem in args.problems:
        for mode in MODES:
            kernel, reference = (
                next(r for r in results if r["implementation"] == i and r["problem"] == problem and r["mode"] == mode)
                for i in IMPLEMENTATIONS
            )
            times = [f"{r['median_ms']:.1f} ({r['min_ms']:.1f})" for r in (kernel, reference)]
            print(
                f"{problem:<9} {kernel['queries']:>7} {mode:<17} {times[0]:>17} {times[1]:>17} "
                f"{reference['median_ms'] / kernel['median_ms']:>8.1f}x "
                f"{kernel['peak_mib']:>11.1f} {reference['peak_mib']:>9.1f}"
            )
    print(f"\nload average after: {_load_average()}")
    print(GOALS)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

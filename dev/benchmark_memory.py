#!/usr/bin/env python
"""Peak memory and time of one DI-MaskDINO training step, by stage, with and without each
activation-checkpointing switch.

    python dev/benchmark_memory.py --config-file configs/coco/dimaskdino_r50_12ep.yaml \\
        --input-size 1024x1024 --batch 1 --device cpu --variants none all

A step is what detectron2's trainer does: forward with the losses (under autocast with
--amp), zero_grad, backward, optimizer step (AdamW with the config's gradient clipping).
The input is --batch random images of --input-size, each with --objects random elliptical
instances (boxes, classes, masks), so that the matcher, the mask losses and the denoising
queries see a COCO-like load; weights are random (nothing is downloaded).

Every variant runs in a fresh process (one after another), so that no measurement sees
another's memory:

  CUDA   one process: `torch.cuda.max_memory_allocated` over the step, and per stage the
         allocator's peak and growth (statistics reset at every stage boundary), plus the
         median step time.
  CPU    two processes. The first measures the peak resident set (`ru_maxrss`) of the
         process over the build and all steps, the resident set before the first step, and
         the median step time (wall clock, and the process's CPU time, which a loaded shared
         machine distorts less; with --threads 1 it is the work done). The second runs one
         step (after a warm-up step) under torch.profiler with profile_memory: every
         allocation and free of PyTorch's CPU allocator, which counts tensors as CUDA's
         allocator does, gives the live tensor bytes over time; added to the tensors alive
         before the step (parameters, gradients, optimizer state, inputs) this is the CPU
         counterpart of max_memory_allocated.

Stages: backbone, encoder, query selection (first selection), DI (token interaction),
decoder (with BATO), head (the prediction heads of the decoder layers), losses (matcher and
criterion), backward, optimizer. For each: the peak of live tensor memory while it runs and
the memory it leaves allocated (its activations). --variants lists the switch sets: "none",
"all", or switch names joined by "+" (backbone, encoder, token_interaction, decoder).

Also printed: the losses of the first step (same seed for every variant: the switches must
not change them) and a Markdown table. --json writes everything.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch

# switch name -> config key under MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING
SWITCHES = {
    "backbone": "BACKBONE",
    "encoder": "ENCODER",
    "token_interaction": "TOKEN_INTERACTION",
    "decoder": "DECODER",
}
# (stage name, dotted module path in the meta-architecture); inner stages after outer ones
STAGES = [
    ("backbone", "backbone"),
    ("encoder", "encoder"),
    ("head", "head"),
    ("query selection", "head.query_selection"),
    ("DI", "head.de_imbalance"),
    ("decoder", "head.decoder"),
    ("losses", "criterion"),
]
STAGE_ORDER = [name for name, _ in STAGES[:2]] + ["query selection", "DI", "decoder", "head", "losses"]
STAGE_ORDER += ["backward", "optimizer"]
MIB = 2**20


def parse_variant(variant: str) -> List[str]:
    if variant == "none":
        return []
    if variant == "all":
        return list(SWITCHES)
    names = variant.split("+")
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        known = ", ".join(SWITCHES)
        raise SystemExit(f"unknown switch(es) {unknown} in variant {variant!r}; known: none, all, {known}")
    return names


# ---------------------------------------------------------------------------------------
# the measured process


def build(args, switches):
    from detectron2.modeling import build_model

    from di_maskdino.d2 import build_optimizer, load_config

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    for name in switches:
        if "ACTIVATION_CHECKPOINTING" not in cfg.MODEL.DI_MASKDINO:
            raise SystemExit(
                "this di_maskdino has no MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING keys: use --variants none"
            )
        cfg.MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING[SWITCHES[name]] = True
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer


def random_inputs(args, num_classes: int, device: str, seed: int = 0) -> List[Dict]:
    """--batch images of random pixels with --objects elliptical instances each."""
    from detectron2.structures import BitMasks, Boxes, Instances

    height, width = args.size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    inputs = []
    for _ in range(args.batch):
        image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        boxes, masks = [], []
        for _ in range(args.objects):
            w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            masks.append(((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1)
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.from_numpy(rng.integers(0, num_classes, args.objects))
        instances.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
        inputs.append({"image": image, "instances": instances, "height": height, "width": width})
    return inputs


class StageMarks:
    """Forward hooks on the stage modules that report every stage boundary to `mark`
    (called with the name of the stage that runs from then on, or None for "between
    stages"); only while `active` (checkpointed regions run their modules again in backward)."""

    def __init__(self, model, mark):
        self.mark = mark
        self.active = False
        self.stack: List[str] = []
        self.handles = []
        for name, path in STAGES:
            module = model
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._exit(name)))

    def _enter(self, name):
        def hook(module, inputs):
            if self.active:
                self.stack.append(name)
                self.mark(name)

        return hook

    def _exit(self, name):
        def hook(module, inputs, output):
            if self.active and self.stack and self.stack[-1] == name:
                self.stack.pop()
                self.mark(self.stack[-1] if self.stack else None)

        return hook


def training_step(model, optimizer, micro_batches, amp: bool, scaler, marks: StageMarks, mark):
    """detectron2's order: forward and losses, zero_grad, backward, step; with several
    micro-batches (--accumulation-steps) forward and backward of each in turn, normalised by
    the objects of all of them (as engine/train_step.py does), then one step. Returns the
    losses of the first micro-batch."""
    device_type = model.device.type
    kwargs = {}
    if len(micro_batches) > 1:
        kwargs["num_objects"] = float(sum(len(x["instances"]) for batch in micro_batches for x in batch))
    first = None
    for index, inputs in enumerate(micro_batches):
        marks.active = True
        with torch.autocast(device_type=device_type, enabled=amp):
            losses = model(inputs, **kwargs)
        marks.active = False
        total = sum(losses.values())
        mark("backward")
        if index == 0:
            optimizer.zero_grad()
            first = {k: float(v) for k, v in losses.items()}
        (total if scaler is None else scaler.scale(total)).backward()
        del losses, total
        mark(None)
    mark("optimizer")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    mark(None)
    return first


def tensor_bytes(model, optimizer, inputs) -> int:
    """Bytes of the distinct storages of parameters, gradients, optimizer state and inputs."""
    seen = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    for batch in inputs:
        for item in batch:
            add(item["image"])
            add(item["instances"].gt_masks.tensor)
    return sum(seen.values())


class CudaMeter:
    """Allocator statistics at every stage boundary."""

    def __init__(self, device):
        self.device = device
        self.segments = []  # (stage, allocated at start, allocated at end, peak)
        self.current = None

    def start(self):
        torch.cuda.synchronize(self.device)
        self.current = (None, torch.cuda.memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.current[1]

    def mark(self, stage):
        now = torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.segments.append((self.current[0], self.current[1], now, peak))
        self.current = (stage, now)
        torch.cuda.reset_peak_memory_stats(self.device)


def profile_segments(prof, base: int):
    """Stage segments from a torch.profiler run: live tensor bytes over time from the CPU
    allocator's events, split at the "stage:" ranges recorded by `mark`."""
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    marks = sorted((e.start_ns(), e.name()[len("stage:") :]) for e in events if e.name().startswith("stage:"))
    segments, live, index = [], base, 0
    while index < len(memory) and marks and memory[index][0] < marks[0][0]:
        live += memory[index][1]
        index += 1
    for position, (_, name) in enumerate(marks):
        end = marks[position + 1][0] if position + 1 < len(marks) else float("inf")
        begin = peak = live
        while index < len(memory) and memory[index][0] < end:
            live += memory[index][1]
            peak = max(peak, live)
            index += 1
        segments.append((None if name in ("None", "between") else name, begin, live, peak))
    return segments


def summarise(segments) -> Dict[str, Dict[str, float]]:
    """Per stage: peak live bytes while it ran, and bytes it left allocated (MiB)."""
    stages: Dict[str, Dict[str, float]] = {}
    for stage, begin, end, peak in segments:
        if stage is None:
            continue
        entry = stages.setdefault(stage, {"peak_mib": 0.0, "kept_mib": 0.0})
        entry["peak_mib"] = max(entry["peak_mib"], peak / MIB)
        entry["kept_mib"] += (end - begin) / MIB
    return stages


def measure(args) -> Dict:
    switches = parse_variant(args.variant)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg, model, optimizer = build(args, switches)
    device = torch.device(args.device)
    inputs = [
        random_inputs(args, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, args.device, seed)
        for seed in range(args.accumulation_steps)
    ]
    scaler = torch.amp.GradScaler(device.type) if args.amp and device.type == "cuda" else None
    result = {
        "variant": args.variant,
        "switches": switches,
        "mode": args.mode,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "batch": args.batch,
        "accumulation_steps": args.accumulation_steps,
        "input_size": list(args.size),
        "di_maskdino": __import__("di_maskdino").__file__,
    }
    noop = lambda stage: None  # noqa: E731

    if args.mode == "profile":  # CPU: allocator events under the profiler, one step after a warm-up
        from torch.profiler import ProfilerActivity, profile, record_function

        marks = StageMarks(model, noop)
        torch.manual_seed(1)
        result["losses"] = training_step(model, optimizer, inputs, args.amp, scaler, marks, noop)
        base = tensor_bytes(model, optimizer, inputs)

        def mark(stage):
            # zero-length ranges: only their start times are used
            with record_function(f"stage:{stage}"):
                pass

        marks.mark = mark
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            mark("between")
            training_step(model, optimizer, inputs, args.amp, scaler, marks, mark)
        segments = profile_segments(prof, base)
        result["base_mib"] = base / MIB
        result["peak_allocated_mib"] = max(p for _, _, _, p in segments) / MIB
        result["stages"] = summarise(segments)
        return result

    # timing (and on CUDA the allocator statistics): warm-up step, then --steps steps
    meter = CudaMeter(device) if device.type == "cuda" else None
    marks = StageMarks(model, meter.mark if meter else noop)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    result["losses"] = training_step(model, optimizer, inputs, args.amp, scaler, marks, noop)
    result["warmup_time_s"] = time.perf_counter() - start
    result["warmup_cpu_time_s"] = time.process_time() - cpu_start
    times, cpu_times = [], []
    for step in range(args.steps):
        if meter is not None and step == 0:
            meter.start()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        training_step(model, optimizer, inputs, args.amp, scaler, marks, meter.mark if (meter and step == 0) else noop)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result["step_times_s"] = times
    result["step_cpu_times_s"] = cpu_times
    result["step_time_s"] = statistics.median(times) if times else None
    if meter is not None:
        result["base_mib"] = meter.base / MIB
        result["peak_allocated_mib"] = max(p for _, _, _, p in meter.segments) / MIB
        result["stages"] = summarise(meter.segments)
    else:
        result["rss_at_start_mib"] = rss_start
        result["rss_before_step_mib"] = rss_before
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---------------------------------------------------------------------------------------
# the orchestrating process


def run_child(args, variant: str, mode: str) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--mode", mode]
    command += ["--config-file", args.config_file, "--input-size", args.input_size, "--batch", str(args.batch)]
    command += ["--device", args.device, "--steps", str(args.steps), "--objects", str(args.objects)]
    command += ["--accumulation-steps", str(args.accumulation_steps)]
    command += ["--threads", str(args.threads)] + (["--amp"] if args.amp else []) + list(args.opts)
    load = os.getloadavg()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"the measurement of variant {variant!r} ({mode}) failed (exit {completed.returncode})")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    result["load_after"] = os.getloadavg()
    return result


def print_report(results: List[Dict]) -> None:
    for r in results:
        print(f"\n== {r['variant']} ({r['mode']}), load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")
        if "step_time_s" in r and r["step_time_s"] is not None:
            print(f"step time: median {r['step_time_s']:.2f} s of {[round(t, 2) for t in r['step_times_s']]}")
            print(f"step CPU time (all threads): {[round(t, 2) for t in r['step_cpu_times_s']]} s")
            print(f"warm-up step: {r['warmup_time_s']:.2f} s, CPU time {r['warmup_cpu_time_s']:.2f} s")
        if "peak_rss_mib" in r:
            print(
                f"resident set: {r['rss_at_start_mib']:.0f} MiB at start, {r['rss_before_step_mib']:.0f} MiB built, "
                f"peak {r['peak_rss_mib']:.0f} MiB"
            )
        if "peak_allocated_mib" in r:
            print(f"tensors: {r['base_mib']:.0f} MiB before the step, peak {r['peak_allocated_mib']:.0f} MiB")
            for stage in STAGE_ORDER:
                if stage in r["stages"]:
                    s = r["stages"][stage]
                    print(f"  {stage:16s} peak {s['peak_mib']:9.0f} MiB   left allocated {s['kept_mib']:+9.0f} MiB")
        if "losses" in r:
            total = sum(r["losses"].values())
            shown = {k: round(v, 5) for k, v in r["losses"].items() if k in ("loss_ce", "loss_mask", "loss_dice")}
            print(f"first-step losses: total {total:.6f}, {shown}")

    by_variant: Dict[str, Dict] = {}
    for r in results:
        by_variant.setdefault(r["variant"], {}).update({k: v for k, v in r.items() if k not in ("mode",)})
    print("\n| variant | peak tensors (MiB) | peak resident set (MiB) | step time (s) | total loss |")
    print("|---|---|---|---|---|")
    for variant, r in by_variant.items():
        peak = f"{r['peak_allocated_mib']:.0f}" if "peak_allocated_mib" in r else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
        step = f"{r['step_time_s']:.2f}" if r.get("step_time_s") else "-"
        loss = f"{sum(r['losses'].values()):.5f}" if "losses" in r else "-"
        print(f"| {variant} | {peak} | {rss} | {step} | {loss} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input-size", default="1024x1024", help="HxW of every image")
    parser.add_argument("--batch", type=int, default=1, help="images per process and micro-batch")
    parser.add_argument(
        "--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step (SOLVER.ACCUMULATION_STEPS)"
    )
    parser.add_argument("--objects", type=int, default=10, help="instances per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on the CPU)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--variants", nargs="+", default=["none", "all"])
    parser.add_argument("--no-profile", action="store_true", help="CPU: skip the allocator profile")
    parser.add_argument("--no-timing", action="store_true", help="CPU: skip the resident-set and timing process")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", choices=["time", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    args.size = tuple(int(v) for v in args.input_size.split("x"))

    if args.child:
        print(json.dumps(measure(args)))
        return 0

    for variant in args.variants:
        parse_variant(variant)
    modes = ["time"]
    if args.device == "cpu":
        modes = ([] if args.no_timing else ["time"]) + ([] if args.no_profile else ["profile"])
    print(f"config {args.config_file}, {args.batch} x {args.input_size}, {args.objects} objects per image, ")
    print(f"device {args.device}, AMP {'on' if args.amp else 'off'}, one fresh process per measurement")
    results = []
    for variant in args.variants:
        for mode in modes:
            results.append(run_child(args, variant, mode))
            print(f"  measured {variant} ({mode})", flush=True)
    print_report(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

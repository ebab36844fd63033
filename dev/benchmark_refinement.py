#!/usr/bin/env python
"""Benchmark: mask refinement on a frozen detector against continued full training, on the
built-in synthetic dataset (README "Mask refinement on a frozen detector").

    python dev/benchmark_refinement.py --output output/benchmark_refinement --iterations 100
    python dev/benchmark_refinement.py ... --detector output/quick_start/model_final.pth  # reuse a detector

1. the quick-start detector: `configs/quick_start.yaml` trained for --detector-iterations
   (skipped with --detector);
2. (a) full training continued from it for N iterations (the quick start's final learning
   rate, SOLVER.BASE_LR x 0.1, constant);
3. (b) only the box-conditioned mask head trained on the frozen detector for the same N
   iterations (`configs/refinement/quick_start_box_masks.yaml`, its schedule scaled to N).

Both are evaluated on synthetic_val by tools/train_net.py (COCO box and mask AP, AP75); (b)
reports the detector's own masks and the refined masks of the same detections. The table
gives trainable parameters, the median seconds per training iteration (detectron2's
iteration timer: data, forward, backward, step) and the wall time of each stage, and the
load average before and after (the machine may be shared). Results go to OUTPUT/results.md
and OUTPUT/results.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK = os.path.join(ROOT, "configs", "quick_start.yaml")
REFINE = os.path.join(ROOT, "configs", "refinement", "quick_start_box_masks.yaml")


def run(tool, arguments, env, log):
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, tool)] + arguments, cwd=ROOT, env=env, stdout=handle, stderr=handle
        )
    if result.returncode != 0:
        raise SystemExit(f"{tool} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def train(config, output, opts, env):
    """Runs train_net.py (training, then evaluation on synthetic_val); returns its wall time."""
    os.makedirs(output, exist_ok=True)
    arguments = ["--config-file", config, "OUTPUT_DIR", output] + opts
    return run("tools/train_net.py", arguments, env, os.path.join(output, "benchmark.log"))


def seconds_per_iteration(output):
    """Median of detectron2's per-iteration "time" over the logged iterations (the first
    logged window, which includes warm-up, is left out when there are others)."""
    times = []
    with open(os.path.join(output, "metrics.json")) as handle:
        for line in handle:
            entry = json.loads(line)
            if "time" in entry and "total_loss" in entry:
                times.append(entry["time"])
    if not times:
        raise SystemExit(f"no iteration times in {output}/metrics.json (train longer than one logging period)")
    return statistics.median(times[1:] or times)


def metrics(output):
    with open(os.path.join(output, "metrics_synthetic_val.json")) as handle:
        return json.load(handle)


def trainable_parameters(config, opts):
    """(trainable, total) parameters of `config` after MODEL.FREEZE, as the trainer counts them."""
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config
    from di_maskdino.d2.solver import freeze_parameters

    cfg = load_config(config, opts)
    return freeze_parameters(build_model(cfg), cfg.MODEL.FREEZE)


def load_average():
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/benchmark_refinement")
    parser.add_argument("--iterations", type=int, default=100, help="N, training iterations of (a) and (b)")
    parser.add_argument("--detector", help="a trained quick-start checkpoint (skips step 1)")
    parser.add_argument("--detector-iterations", type=int, default=600)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: as set)")
    args = parser.parse_args()
    if args.iterations < 40:
        raise SystemExit("--iterations must be at least 40 (two logging periods of 20 iterations)")

    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if not os.path.isfile(os.path.join(env["DETECTRON2_DATASETS"], "synthetic", "train.json")):
        run(
            "datasets/make_synthetic.py",
            ["--output", os.path.join(env["DETECTRON2_DATASETS"], "synthetic")],
            env,
            os.path.join(output, "make_synthetic.log"),
        )

    report = {"load_average_before": load_average(), "iterations": args.iterations}
    detector = args.detector and os.path.abspath(args.detector)
    if detector is None:
        folder = os.path.join(output, "detector")
        opts = ["SOLVER.MAX_ITER", str(args.detector_iterations), "SOLVER.CHECKPOINT_PERIOD", "100000"]
        report["detector_wall_s"] = train(QUICK, folder, opts, env)
        detector = os.path.join(folder, "model_final.pth")
    report["detector"] = detector

    n = args.iterations
    full_opts = ["MODEL.WEIGHTS", detector, "SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", "()"]
    full_opts += ["SOLVER.BASE_LR", "0.00005", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000"]
    refine_opts = ["MODEL.WEIGHTS", detector, "SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", f"({int(0.8 * n)},)"]
    refine_opts += ["SOLVER.CHECKPOINT_PERIOD", "100000"]
    runs = {
        "(a) full training": (QUICK, os.path.join(output, "full"), full_opts),
        "(b) box mask head on the frozen detector": (REFINE, os.path.join(output, "refine"), refine_opts),
    }
    for name, (config, folder, opts) in runs.items():
        wall = train(config, folder, opts, env)
        trainable, total = trainable_parameters(config, opts + ["MODEL.DEVICE", "cpu"])
        report[name] = {
            "wall_s": wall,
            "s_per_iter": seconds_per_iteration(folder),
            "trainable_parameters": trainable,
            "parameters": total,
            "metrics": metrics(folder),
        }
    report["load_average_after"] = load_average()
    with open(os.path.join(output, "results.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    table = markdown(report, runs)
    with open(os.path.join(output, "results.md"), "w") as handle:
        handle.write(table)
    print(table)


def markdown(report, runs):
    full, refine = (report[name] for name in runs)
    rows = [
        "| run | trainable / all parameters | s / iteration | wall (train + eval) | mask AP | mask AP75 | box AP |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, entry, segm, bbox):
        m = entry["metrics"]
        rows.append(
            f"| {name} | {entry['trainable_parameters']:,} / {entry['parameters']:,} | {entry['s_per_iter']:.3f} | "
            f"{entry['wall_s']:.0f} s | {m[segm]['AP']:.1f} | {m[segm]['AP75']:.1f} | {m[bbox]['AP']:.1f} |"
        )

    row("(a) full training", full, "segm", "bbox")
    row("(b) frozen detector, its own masks", refine, "segm_detector", "bbox_detector")
    row("(b) frozen detector, refined masks", refine, "segm", "bbox")
    ratio = refine["s_per_iter"] / full["s_per_iter"]
    lines = [
        f"N = {report['iterations']} iterations each; detector {report['detector']}"
        + (f" (trained here in {report['detector_wall_s']:.0f} s)" if "detector_wall_s" in report else ""),
        "",
        *rows,
        "",
        f"(b) / (a) time per iteration: {ratio:.2f}",
        f"load average before: {report['load_average_before']}; after: {report['load_average_after']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Runs a list of configurations (e.g. the rows of one of the paper's tables) one after the
other with tools/train_net.py and collects their final box and mask AP into one table.

    # Tab. 4: the full model, DI only, BATO only, neither
    python tools/run_ablations.py --output output/tab4 --num-gpus 8 --baseline dimaskdino_r50_12ep \\
        --configs configs/coco/dimaskdino_r50_12ep.yaml configs/ablations/tab4_*.yaml
    # Tab. 3 from runs that already exist (relative drop against the standard run)
    python tools/run_ablations.py --output output/tab3 --collect-only --baseline dimaskdino_r50_12ep \\
        --configs configs/coco/dimaskdino_r50_12ep.yaml configs/ablations/tab3_dimaskdino_*.yaml

Each run trains in OUTPUT/<config name> (rerunning resumes it); arguments after "--" are
config overrides given to every run. Writes OUTPUT/results.md and OUTPUT/results.csv; with
--baseline, the table adds the change of each AP relative to that run, in percent.
"""

import argparse
import csv
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


def final_metrics(output_dir: str):
    """(dataset, {"bbox": AP, "segm": AP}) from the metrics file train_net.py wrote."""
    files = sorted(glob.glob(os.path.join(output_dir, "metrics_*.json")))
    if not files:
        raise SystemExit(f"{output_dir}: no metrics_<dataset>.json - did the run finish with an evaluation?")
    with open(files[0]) as handle:
        metrics = json.load(handle)
    return os.path.basename(files[0])[len("metrics_") : -len(".json")], {
        task: metrics[task]["AP"] for task in ("bbox", "segm")
    }


def relative(value: float, reference: float) -> str:
    return f"{(value - reference) / reference * 100:+.1f}%" if reference else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--baseline", help="name of the run (config file name) the others are compared with")
    parser.add_argument("--collect-only", action="store_true", help="only read the metrics of finished runs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... overrides for every run")
    args = parser.parse_args()
    overrides = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    names = [run_name(c) for c in args.configs]
    if len(set(names)) != len(names):
        raise SystemExit(f"two configs share a name: {names}")
    if args.baseline and args.baseline not in names:
        raise SystemExit(f"--baseline {args.baseline} is not one of the runs {names}")

    rows = []
    for config, name in zip(args.configs, names):
        output_dir = os.path.join(args.output, name)
        if not args.collect_only:
            command = [
                sys.executable,
                os.path.join(ROOT, "tools", "train_net.py"),
                "--config-file",
                config,
                "--num-gpus",
                str(args.num_gpus),
                "--resume",
                *overrides,
                "OUTPUT_DIR",
                output_dir,
            ]
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise SystemExit(f"run {name} failed; its log is in {output_dir}/log.txt")
        dataset, metrics = final_metrics(output_dir)
        rows.append({"run": name, "dataset": dataset, "box AP": metrics["bbox"], "mask AP": metrics["segm"]})

    columns = ["run", "dataset", "box AP", "mask AP"]
    if args.baseline:
        reference = next(r for r in rows if r["run"] == args.baseline)
        columns += ["box AP change", "mask AP change"]
        for row in rows:
            row["box AP change"] = relative(row["box AP"], reference["box AP"])
            row["mask AP change"] = relative(row["mask AP"], reference["mask AP"])
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            "| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.output, "results.md"), "w") as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

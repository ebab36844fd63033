"""The analysis tools of the paper: per-layer evaluation, ablation runner, model benchmark."""

import csv
import json
import math
import re
import time

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from di_maskdino.cpu_inference.winograd import winograd_available  # noqa: E402
from tests.tooling import QUICK, load_script, run_tool  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs a tool in a subprocess

DECODER_LAYERS = 3  # configs/quick_start.yaml


def test_every_layer_in_one_pass_and_the_last_equals_the_standard_evaluation(trained, data_root, tmp_path):
    run_tool(
        "analyze_imbalance.py",
        ["--config-file", QUICK, "--output", str(tmp_path), "MODEL.WEIGHTS", str(trained / "model_final.pth")],
        data_root,
    )
    table = json.loads((tmp_path / "imbalance.json").read_text())
    layers = [f"layer {i}" for i in range(DECODER_LAYERS + 1)]
    assert list(table) == layers + ["TI 0.0"]
    for name in layers:
        assert set(table[name]) == {"bbox", "segm"} and all(math.isfinite(v) for v in table[name].values())
    assert set(table["TI 0.0"]) == {"bbox"}
    standard = json.loads((trained / "metrics_synthetic_val.json").read_text())
    assert table[layers[-1]]["bbox"] == pytest.approx(standard["bbox"]["AP"], abs=1e-9)
    assert table[layers[-1]]["segm"] == pytest.approx(standard["segm"]["AP"], abs=1e-9)
    assert (tmp_path / "imbalance.png").stat().st_size > 0 and "| layer 0 |" in (tmp_path / "imbalance.md").read_text()


def test_ablation_runner_collects_a_table(data_root, tmp_path):
    configs = []
    for name, override in (("full", ""), ("no_bato", "    BATO:\n      ENABLED: False\n")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"_BASE_: {QUICK}\nMODEL:\n  DI_MASKDINO:\n    NUM_CLASSES: 3\n{override}")
        configs.append(str(path))
    output = tmp_path / "out"
    run_tool(
        "run_ablations.py",
        [
            "--output",
            str(output),
            "--baseline",
            "full",
            "--configs",
            *configs,
            "--",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
        ],
        data_root,
    )
    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["full", "no_bato"]
    assert all(math.isfinite(float(r["box AP"])) and math.isfinite(float(r["mask AP"])) for r in rows)
    assert rows[0]["box AP change"] in ("+0.0%", "")  # "" when the baseline's AP is 0
    assert len((output / "results.md").read_text().strip().splitlines()) == 4  # header, rule, two rows


def test_model_benchmark_reports_size_flops_and_time(data_root):
    result = run_tool(
        "dev/benchmark_model.py",
        # the overrides after --backend's values are overrides, not more backends
        # at 256 x 256 the 64-channel 3x3 convolutions at 1/4 run by Winograd (di_maskdino/cpu_inference/winograd.py)
        ["--config-file", QUICK, "--input-size", "256x256", "--warmup", "0", "--repeats", "1", "--breakdown"]
        + ["--retain-freed-memory", "--backend", "eager", "MODEL.DEVICE", "cpu"],
        data_root,
    )
    out = result.stdout
    for fragment in ("parameters:", "FLOPs:", "ms_deform_attn_forward", "model time:", "FPS", "peak memory"):
        assert fragment in out, fragment
    assert "page faults per run" in out and "freed memory is retained" in out
    if winograd_available():
        assert "3x3 stride-1 convolutions of eager / compile: Winograd (NNPACK)" in out
    shares = {
        kind: float(share)
        for kind, share in re.findall(r"    (matrix products|deformable attention|other): \d+ ms \((\d+)%\)", out)
    }
    assert set(shares) == {"matrix products", "deformable attention", "other"}, out
    assert 97 <= sum(shares.values()) <= 103 and shares["matrix products"] > 0
    assert "matrix products ran at" in out  # their FLOPs were counted


def test_paired_timing_alternates_the_order_and_times_each_function():
    benchmark = load_script("dev/benchmark_model.py", "benchmark_model")
    calls = []

    def sleeper(name, seconds):
        def function():
            calls.append(name)
            time.sleep(seconds)

        return function

    first_time, second_time, ratio, runs = benchmark.timed_pair(
        sleeper("a", 0.01), sleeper("b", 0.03), benchmark.torch.device("cpu"), warmup=1, repeats=4
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(runs) == 4 and all(b > a for a, b in runs)
    assert 0.01 <= first_time < 0.02 and 0.03 <= second_time < 0.045
    assert 2.0 < ratio < 3.5


def test_model_benchmark_times_a_switch_against_the_model_without_it(data_root):
    args = ["--config-file", QUICK, "--input-size", "112x128", "--warmup", "0", "--repeats", "2", "--no-flops"]
    result = run_tool(
        "dev/benchmark_model.py",
        args + ["--versus", "MODEL.DI_MASKDINO.PADDING_MASK True", "--backend", "eager"],
        data_root,
    )
    line = re.search(
        r"versus MODEL.DI_MASKDINO.PADDING_MASK True, run by run: model time ([\d.]+) ms against ([\d.]+) ms; "
        r"ratio \(second / first\) median ([\d.]+) over 2 runs",
        result.stdout,
    )
    assert line, result.stdout
    assert all(float(value) > 0 for value in line.groups())
    refused = run_tool(
        "dev/benchmark_model.py", args + ["--versus", "MODEL.DI_MASKDINO.DEC_LAYERS 2"], data_root, check=False
    )
    assert refused.returncode != 0 and "changes the model's parameters" in refused.stderr

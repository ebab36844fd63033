"""dev/benchmark_memory.py on the quick-start model: every stage is reported, the switches
lower the peak of live tensors and leave the losses as they are."""

import json
import os
import subprocess
import sys

import pytest

from tests.tooling import ROOT  # noqa: E402

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")


@pytest.mark.slow
def test_benchmark_memory_reports_stages_and_the_switches_save_memory(tmp_path):
    output = tmp_path / "memory.json"
    command = [sys.executable, os.path.join(ROOT, "dev", "benchmark_memory.py")]
    command += ["--config-file", os.path.join(ROOT, "configs", "quick_start.yaml"), "--input-size", "256x256"]
    command += ["--batch", "2", "--objects", "3", "--steps", "1", "--variants", "none", "all", "--json", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| variant | peak tensors (MiB)" in result.stdout
    runs = {(r["variant"], r["mode"]): r for r in json.loads(output.read_text())}
    assert set(runs) == {(v, m) for v in ("none", "all") for m in ("time", "profile")}
    stages = {"backbone", "encoder", "query selection", "DI", "decoder", "head", "losses", "backward", "optimizer"}
    for (_, mode), run in runs.items():
        assert run["losses"] == runs[("none", "time")]["losses"]  # same seed, same losses
        if mode == "profile":
            assert set(run["stages"]) == stages
            assert run["peak_allocated_mib"] >= max(s["peak_mib"] for s in run["stages"].values()) > run["base_mib"]
        else:
            assert run["peak_rss_mib"] >= run["rss_before_step_mib"] and run["step_time_s"] > 0
    assert runs[("all", "profile")]["peak_allocated_mib"] < runs[("none", "profile")]["peak_allocated_mib"]
    assert (
        runs[("all", "profile")]["stages"]["encoder"]["kept_mib"]
        < runs[("none", "profile")]["stages"]["encoder"]["kept_mib"]
    )

"""dev/benchmark_explorer.py runs on the quick-start model and reports its three timings and
their ratio (that it runs and what it prints, not how fast)."""

import re

import pytest

from tests.tooling import QUICK, run_tool

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

pytestmark = pytest.mark.slow  # a subprocess that builds and runs the model


def test_the_benchmark_reports_its_timings(tmp_path):
    result = run_tool(
        "dev/benchmark_explorer.py",
        ["--config-file", QUICK, "--input-size", "96x128", "--repeats", "2", "--warmup", "0"],
        tmp_path,
    )
    assert "96 x 128, 5 stages" in result.stdout
    for name in ("inference", "new image", "slider move"):
        runs = re.search(rf"{name}\s+median\s+([\d.]+) ms\s+\(([\d, ]+)\)", result.stdout)
        assert runs and float(runs.group(1)) > 0 and len(runs.group(2).split(",")) == 2, result.stdout
    assert re.search(r"new image / inference: \d+\.\d\d", result.stdout)

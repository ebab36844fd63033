"""Shared fixtures of the tests of the detectron2 layer and of the scripts: a synthetic
dataset and a briefly trained quick-start model (both made once per test session, when a
test asks for them)."""

import os
import subprocess
import sys

import pytest

from tests.tooling import QUICK, ROOT, run_tool


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "datasets", "make_synthetic.py"),
            "--output",
            str(root / "synthetic"),
            "--num-train",
            "8",
            "--num-val",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="session")
def trained(data_root, tmp_path_factory):
    """20 iterations of the quick-start config, then its evaluation."""
    output = tmp_path_factory.mktemp("train")
    run_tool(
        "train_net.py",
        ["--config-file", QUICK, "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "10", "OUTPUT_DIR", str(output)],
        data_root,
    )
    return output

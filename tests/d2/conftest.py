"""Shared fixtures of the detectron2-layer tests: a synthetic dataset and a briefly trained
quick-start model (both made once per test session)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quick_start.yaml")
# a small box mask head on the quick-start model (config overrides)
SMALL_BOX_MASK_HEAD = [
    "MODEL.DI_MASKDINO.BOX_MASK_HEAD.ENABLED",
    "True",
    "MODEL.DI_MASKDINO.BOX_MASK_HEAD.HIDDEN_DIM",
    "16",
    "MODEL.DI_MASKDINO.BOX_MASK_HEAD.ROI_SIZE",
    "7",
    "MODEL.DI_MASKDINO.BOX_MASK_HEAD.MASK_SIZE",
    "14",
]


def run_tool(tool, args, data_root, check=True):
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", tool)] + args, capture_output=True, text=True, env=env, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


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

"""tools/export_model.py end to end on the quick-start config: it refuses to export without
weights, and with --allow-random-weights writes the torch.export program, verifies it
against the eager model and prints differences that are zero (the same kernels run)."""

import re

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from tests.tooling import QUICK, run_tool  # noqa: E402

pytestmark = pytest.mark.slow  # exports the quick-start model in a subprocess (about a minute)


def test_export_refuses_random_weights(data_root, tmp_path):
    result = run_tool(
        "export_model.py", ["--config-file", QUICK, "--output", str(tmp_path), "--formats", "export"], data_root, False
    )
    assert result.returncode == 2
    assert "MODEL.WEIGHTS is not set" in result.stderr and "--allow-random-weights" in result.stderr
    assert not list(tmp_path.iterdir())


def test_export_and_verify(data_root, tmp_path):
    args = ["--config-file", QUICK, "--output", str(tmp_path), "--formats", "export", "--verify"]
    result = run_tool("export_model.py", args + ["--allow-random-weights"], data_root)
    assert (tmp_path / "model.pt2").is_file()
    assert "UNTRAINED" in result.stderr
    lines = [line for line in result.stdout.splitlines() if "model.pt2 batch" in line]
    assert len(lines) == 2  # a batch of two images, then one image of a third size
    for line in lines:
        differences = dict(re.findall(r"(scores|labels|boxes|mask_logits) ([0-9.e+-]+)", line))
        assert set(differences) == {"scores", "labels", "boxes", "mask_logits"}, line
        assert all(float(value) <= 1e-4 for value in differences.values()), line

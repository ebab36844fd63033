"""dev/gpu_model_check.py (the model stage of dev/gpu_check.sh) on the CPU, with the small
quick-start configuration: it builds the model, times inference in float32 and AMP, trains a
few AMP iterations on synthetic data and reports finite losses and the peak memory."""

import os
import re
import subprocess
import sys

import pytest

from tests.tooling import ROOT  # noqa: E402

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")


@pytest.mark.slow
def test_inference_and_amp_training_report():
    command = [
        sys.executable,
        os.path.join(ROOT, "dev", "gpu_model_check.py"),
        "--config-file",
        os.path.join(ROOT, "configs", "quick_start.yaml"),
        "--device",
        "cpu",
        "--input-size",
        "96x128",
        "--fps-warmup",
        "0",
        "--fps-repeats",
        "1",
        "--train-iters",
        "2",
        "--batch",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"inference float32: [\d.]+ ms per image, [\d.]+ FPS", result.stdout)
    assert re.search(r"inference AMP bfloat16: [\d.]+ ms per image", result.stdout)
    match = re.search(
        r"training AMP bfloat16: 2 iterations .* total loss ([\d.]+) -> ([\d.]+), peak memory (\d+) MiB", result.stdout
    )
    assert match and float(match.group(1)) > 0 and int(match.group(3)) > 0

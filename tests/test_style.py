"""The tree follows the lint and format rules of pyproject.toml (`ruff check`, `ruff format`)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")
needs_ruff = pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -r requirements.txt)")


@needs_ruff
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    completed = subprocess.run([RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, (
        f"`ruff {' '.join(command)} .` found problems:\n{completed.stdout}{completed.stderr}"
    )

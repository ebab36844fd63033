"""The package's layering contracts (pyproject.toml, [tool.importlinter], checked by
import-linter): they hold for the package, and they catch each kind of breach they forbid
(run on a copy of the package with one bad import added)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lint(package_parent: str) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contracts, on the di_maskdino found in `package_parent`."""
    env = dict(os.environ, PYTHONPATH=package_parent)
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; c()"]
    return subprocess.run(
        command + ["--config", os.path.join(ROOT, "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
    )


def test_the_package_keeps_its_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(
        os.path.join(ROOT, "di_maskdino"),
        tmp_path / "di_maskdino",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    return tmp_path


def add_import(root, module: str, statement: str) -> None:
    path = root / "di_maskdino" / module
    path.write_text(path.read_text() + f"\n{statement}\n")


@pytest.mark.parametrize(
    "module,statement,contract",
    [
        ("modeling/boxes.py", "import detectron2.structures  # noqa", "imports neither detectron2"),
        ("predictor.py", "from .d2 import engine  # noqa", "imports neither detectron2"),
        ("ops/reference.py", "from ..layers import blocks  # noqa", "Layers, top down"),
        ("d2/data/samplers.py", "from ..engine import trainer  # noqa", "No import cycles"),
    ],
)
def test_each_contract_catches_its_breach(package_copy, module, statement, contract):
    add_import(package_copy, module, statement)
    result = lint(str(package_copy))
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if "BROKEN" in line]
    assert any(contract in line for line in broken), result.stdout[-3000:]

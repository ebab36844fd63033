"""setup.py's search for the CUDA toolkit and its default architecture list, on fake toolkits
(small directory trees with an nvcc script) and on this machine's."""

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("di_maskdino_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def write_script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_toolkit(root: Path, release: str) -> Path:
    """bin/nvcc answering --version and --dryrun as nvcc does, lib64/libcudart.so, include/."""
    write_script(
        root / "bin" / "nvcc",
        'case "$*" in\n'
        f'  *--version*) echo "Cuda compilation tools, release {release}, V{release}.99" ;;\n'
        f'  *--dryrun*) echo "#\\$ TOP={root}/bin/.." >&2 ;;\n'
        "esac\n",
    )
    (root / "lib64").mkdir(parents=True)
    (root / "lib64" / "libcudart.so").write_text("")
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_toolkit_behind_a_wrapper_script_is_found(setup_module, tmp_path):
    """`which nvcc` is a wrapper in another prefix (here as in /usr/local/bin): the toolkit is
    where the wrapped nvcc says it is, not the wrapper's parent (which has no libcudart)."""
    toolkit = fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    write_script(tmp_path / "prefix" / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    root, how = setup_module.find_cuda_home({"PATH": str(tmp_path / "prefix" / "bin")}, fallbacks=())
    assert root == str(toolkit.resolve()) and "nvcc" in how
    assert setup_module.toolkit_problem(str(tmp_path / "prefix")) is not None


def test_symlinked_nvcc_is_followed(setup_module, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-11.8", "11.8")
    (tmp_path / "bin").mkdir()
    os.symlink(toolkit / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    assert setup_module.find_cuda_home({"PATH": str(tmp_path / "bin")}, fallbacks=())[0] == str(toolkit.resolve())


def test_cuda_home_wins_and_a_wrong_one_is_named(setup_module, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda", "12.1")
    assert setup_module.find_cuda_home({"CUDA_HOME": str(toolkit), "PATH": ""}, fallbacks=()) == (
        str(toolkit),
        "CUDA_HOME",
    )
    root, why = setup_module.find_cuda_home({"CUDA_HOME": str(tmp_path), "PATH": ""}, fallbacks=())
    assert root is None and f"CUDA_HOME={tmp_path} is not a CUDA toolkit root" in why and "bin/nvcc" in why


def test_nothing_found_says_why(setup_module, tmp_path):
    root, why = setup_module.find_cuda_home({"PATH": str(tmp_path)}, fallbacks=(str(tmp_path / "missing"),))
    assert root is None and why == "no nvcc on PATH"
    assert "CUDA_HOME" in setup_module.CUDA_HOME_HINT and "lib64/libcudart.so" in setup_module.CUDA_HOME_HINT


@pytest.mark.parametrize(
    "version, expected",
    [
        ((13, 0), "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((12, 8), "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((12, 6), "7.5;8.0;8.6;8.9;9.0+PTX"),  # sm_100 / sm_120 need nvcc 12.8
        ((11, 8), "7.5;8.0;8.6;8.9;9.0+PTX"),
        ((11, 0), "7.5;8.0+PTX"),
        (None, "7.5;8.0;8.6;8.9;9.0+PTX"),
    ],
)
def test_default_architectures_follow_the_nvcc_version(setup_module, version, expected):
    assert setup_module.default_arch_list(version) == expected


def test_nvcc_version_is_read_from_the_toolkit(setup_module, tmp_path):
    assert setup_module.nvcc_version(str(fake_toolkit(tmp_path / "cuda", "12.6"))) == (12, 6)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_this_machines_toolkit(setup_module):
    root, _ = setup_module.find_cuda_home(os.environ)
    assert root is not None and setup_module.toolkit_problem(root) is None
    assert setup_module.nvcc_version(root) is not None

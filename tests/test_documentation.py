"""The user documentation stays true: every file path, config file, config key and
command-line option it cites exists, every tool it names answers --help, and its Python
code blocks run as written (on the quick-start model and a synthetic dataset)."""

import glob
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache

import pytest

from tests.tooling import QUICK, ROOT

DOCUMENTS = sorted(
    [os.path.join(ROOT, name) for name in ("README.md", "INSTALL.md", "GETTING_STARTED.md", "MODEL_ZOO.md")]
    + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    + [os.path.join(ROOT, "tools", "README.md"), os.path.join(ROOT, "dev", "README.md")]
)
TOP_FOLDERS = ("configs", "tools", "dev", "di_maskdino", "docs", "tests", "csrc", "datasets", ".ci")
# folders that users fill (datasets, outputs): paths under them are examples, not files of the tree
USER_DATA = re.compile(r"^datasets/(?!\w+\.py$)|^output/|^data/")
PATH = re.compile(r"(?<![\w/.-])((?:\.ci|configs|tools|dev|di_maskdino|docs|tests|csrc|datasets)/[\w./*-]*[\w*/])")
PACKAGE_PATH = re.compile(r"`((?:modeling|layers|ops|export|d2|cpu_inference|synthetic)/[\w./]+\.py)`")
KEY = re.compile(r"(?<![\w.])([A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+)(?![\w(])")
COMMAND = re.compile(r"python ((?:tools|dev|datasets)/\w+\.py)((?:[^\n\\]|\\\n)*)")


def text_of(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def cited_paths(text: str):
    for path in PATH.findall(text):
        path = path.rstrip(".")
        if "{" in path or "<" in path or USER_DATA.match(path):
            continue
        yield path


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_cited_paths_exist(document):
    text = text_of(document)
    missing = [p for p in cited_paths(text) if not glob.glob(os.path.join(ROOT, p))]
    missing += [p for p in PACKAGE_PATH.findall(text) if not os.path.exists(os.path.join(ROOT, "di_maskdino", p))]
    # links between the documents
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(document), link))):
            missing.append(link)
    assert not missing, f"{os.path.relpath(document, ROOT)} cites what does not exist: {sorted(set(missing))}"


@lru_cache(maxsize=1)
def full_config():
    pytest.importorskip("detectron2", reason="detectron2 is not installed: config keys cannot be checked")
    from detectron2.config import get_cfg

    from di_maskdino.d2 import add_di_maskdino_config

    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    return cfg


def names_a_config_entry(key: str) -> bool:
    """Whether `key` (possibly under MODEL.DI_MASKDINO., as the documents abbreviate it, or
    ending with a wildcard) names a config node or value."""
    key = key.rstrip(".*")
    for root in ("", "MODEL.DI_MASKDINO.", "MODEL."):
        node = full_config()
        for part in (root + key).split("."):
            if not hasattr(node, "keys") or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_cited_config_keys_exist(document):
    text = text_of(document)
    keys = set(KEY.findall(text)) - {"README.md", "INSTALL.md", "MODEL_ZOO.md", "GETTING_STARTED.md"}
    unknown = sorted(k for k in keys if not k.endswith(".md") and not names_a_config_entry(k))
    assert not unknown, f"{os.path.relpath(document, ROOT)} cites config keys that do not exist: {unknown}"


def commands():
    """(script, options) of every command line of the documents."""
    found = {}
    for document in DOCUMENTS:
        for script, rest in COMMAND.findall(text_of(document)):
            options = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
            found.setdefault(script, set()).update(options)
    return sorted(found.items())


@lru_cache(maxsize=None)
def help_of(script: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.parametrize("script,options", commands(), ids=[s for s, _ in commands()])
def test_cited_commands_parse(script, options):
    if script.startswith(("tools/", "dev/")) and script not in ("tools/check_install.py",):
        pytest.importorskip("detectron2", reason="detectron2 is not installed: the tools need it")
    if script == "tools/check_install.py":
        return  # takes no options; it runs as the setup's self-check
    assert os.path.isfile(os.path.join(ROOT, script))
    usage = help_of(script)
    unknown = sorted(option for option in options if option not in usage)
    assert not unknown, f"{script} has no option {unknown}"


def python_blocks():
    blocks = []
    for document in DOCUMENTS:
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", text_of(document), flags=re.S)):
            blocks.append(pytest.param(code, id=f"{os.path.relpath(document, ROOT)}:{number}"))
    return blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as a clone after the quick start: configs/, datasets/synthetic and
    output/quick_start/model_final.pth (here: the quick-start model's initial weights)."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed: the code blocks use it")
    import torch
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config

    root = tmp_path_factory.mktemp("clone")
    os.symlink(os.path.join(ROOT, "configs"), root / "configs")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "datasets", "make_synthetic.py"),
            "--output",
            str(root / "datasets" / "synthetic"),
            "--num-train",
            "2",
            "--num-val",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    torch.manual_seed(0)
    weights = root / "output" / "quick_start" / "model_final.pth"
    weights.parent.mkdir(parents=True)
    torch.save({"model": build_model(load_config(QUICK)).state_dict()}, weights)
    return root


@pytest.mark.parametrize("code", python_blocks())
def test_python_blocks_run_as_written(code, workspace):
    env = dict(os.environ, DETECTRON2_DATASETS=str(workspace / "datasets"))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=workspace, env=env, timeout=600
    )
    assert result.returncode == 0, f"the block fails:\n{code}\n{result.stderr[-3000:]}"


def test_the_test_command_of_the_readme_is_what_ci_runs():
    readme, ci = text_of(os.path.join(ROOT, "README.md")), text_of(os.path.join(ROOT, ".ci", "run"))
    command = "python -m pytest -q tests"
    assert command in readme and ci.rstrip().endswith(command)
    assert "bash tools/setup.sh" in readme and shutil.which("bash")

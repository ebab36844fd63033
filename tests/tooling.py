"""What the tests of the detectron2 layer and of the scripts share: the repository's paths,
the quick-start config, a small box mask head, and running a script as a user runs it."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """Runs a script of the repository (`tool`: "tools/train_net.py", "dev/benchmark_model.py";
    a bare name is one of tools/) in a subprocess, with its datasets under `data_root`."""
    path = os.path.join(ROOT, tool if os.sep in tool or "/" in tool else os.path.join("tools", tool))
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root))
    result = subprocess.run([sys.executable, path] + args, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def load_script(tool: str, name: str):
    """A script of the repository (`tool` as in `run_tool`) loaded as module `name`, to test
    its functions in process (tools/ and dev/ are not packages)."""
    path = os.path.join(ROOT, tool if os.sep in tool or "/" in tool else os.path.join("tools", tool))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

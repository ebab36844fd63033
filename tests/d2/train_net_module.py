"""tools/ is not a package: load tools/train_net.py as a module for tests."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_train_net():
    spec = importlib.util.spec_from_file_location("di_maskdino_train_net", os.path.join(ROOT, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

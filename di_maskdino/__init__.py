"""DI-MaskDINO: joint object detection and instance segmentation (Nan et al., NeurIPS 2024).

The model core (`di_maskdino.ops`, `di_maskdino.layers`, `di_maskdino.modeling`,
`di_maskdino.export`, `di_maskdino.Predictor`) needs only PyTorch and its companions;
`di_maskdino.d2` is the detectron2 layer. `Predictor` (batch inference on eager or exported
models) is imported on first use.
"""

from .dependencies import import_quietly

__version__ = "0.1.0"

try:
    import_quietly("fvcore.nn")  # imported by the model's layers; see dependencies.py for why quietly
except ImportError:  # the operators (di_maskdino.ops) need torch alone; the layers name what is missing
    pass

__all__ = ["Predictor"]


def __getattr__(name):
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'di_maskdino' has no attribute {name!r}")

"""DI-MaskDINO: joint object detection and instance segmentation (Nan et al., NeurIPS 2024).

The model core (``di_maskdino.ops``, ``di_maskdino.layers``, ``di_maskdino.modeling``) needs
only PyTorch and its companions; ``di_maskdino.d2`` is the detectron2 layer. ``Predictor``
(batch inference on eager or exported models) is imported on first use.
"""

import warnings

__version__ = "0.1.0"

with warnings.catch_warnings():
    # fvcore.nn scripts its focal loss with torch.jit when it is first imported (detectron2
    # imports it), which torch deprecates: two FutureWarnings about code neither we nor the
    # user call. Importing it here, first, keeps them out of every run; other warnings stay.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:  # the core's own imports say what is missing
        pass
__all__ = ["Predictor"]


def __getattr__(name):
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'di_maskdino' has no attribute {name!r}")

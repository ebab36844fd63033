"""DI-MaskDINO: joint object detection and instance segmentation (Nan et al., NeurIPS 2024).

The model core (``di_maskdino.ops``, ``di_maskdino.layers``) needs only PyTorch.
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

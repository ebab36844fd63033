"""DI-MaskDINO: joint object detection and instance segmentation (Nan et al., NeurIPS 2024).

The model core (``di_maskdino.ops``, ``di_maskdino.layers``) needs only PyTorch.
"""

__version__ = "0.1.0"

"""Box arithmetic of iterative refinement.

Boxes are normalised (cx, cy, w, h) in [0, 1] unless a name says otherwise; "logits" are
their inverse sigmoid, the space in which box refinements are added.
"""

import torch

__all__ = ["inverse_sigmoid", "refine_boxes"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x kept above `eps`."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(boxes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Iterative box refinement of normalised boxes: sigmoid(delta + logit(boxes))."""
    return (delta + inverse_sigmoid(boxes)).sigmoid()

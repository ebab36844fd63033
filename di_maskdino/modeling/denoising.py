"""Denoising queries (DN-DETR / DINO, MaskDINO's "seg" variant): noised copies of the
ground-truth labels and boxes that the decoder learns to reconstruct.

The ground truths of every image are repeated in G groups, each padded to the largest
number of objects in the batch (M), so D = G * M queries precede the N matching queries.
The self-attention mask keeps the groups from seeing each other and the matching queries
from seeing any denoising query. The denoising queries never enter the DI selections or
BATO's choice of guiding tokens: they are added after the second selection.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .boxes import inverse_sigmoid

__all__ = ["DenoisingQueries", "DenoisingGenerator", "denoising_attention_mask"]


@dataclass
class DenoisingQueries:
    """content: (B, D, C) label embeddings; box_logits: (B, D, 4); D = num_groups * group_size.
    Query g * group_size + j of image b reconstructs target j of image b (j < num_targets[b])."""

    content: torch.Tensor
    box_logits: torch.Tensor
    num_groups: int
    group_size: int
    num_targets: List[int]

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size


def denoising_attention_mask(num_groups: int, group_size: int, num_matching: int, device: torch.device) -> torch.Tensor:
    """(D + N, D + N) bool self-attention mask, True where a query may not look.

    Matching queries (the last N) see only each other; a denoising query sees its own group
    and the matching queries."""
    num_dn = num_groups * group_size
    total = num_dn + num_matching
    group = torch.arange(total, device=device) // max(group_size, 1)
    is_dn = torch.arange(total, device=device) < num_dn
    other_group = group[:, None] != group[None, :]
    blocked = is_dn[:, None] & is_dn[None, :] & other_group  # DN -> other DN groups
    blocked |= ~is_dn[:, None] & is_dn[None, :]  # matching -> DN
    return blocked


class DenoisingGenerator(nn.Module):
    """Builds denoising queries from targets.

    Args:
        num_classes: K, the size of the label embedding.
        hidden_dim: C.
        num_queries: total budget D_max; the number of groups is D_max // (largest number
            of objects in an image of the batch).
        noise_scale: box noise amplitude lambda; a label is replaced by a random class with
            probability lambda / 2.
    """

    def __init__(self, num_classes: int, hidden_dim: int, num_queries: int = 100, noise_scale: float = 0.4):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.noise_scale = noise_scale
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def forward(self, targets: List[Dict[str, torch.Tensor]]) -> Optional[DenoisingQueries]:
        """targets: per image "labels" (M_b,) int64 and "boxes" (M_b, 4) normalised cxcywh.
        Returns None when the batch has no object or the budget allows no group."""
        num_targets = [int(t["labels"].numel()) for t in targets]
        group_size = max(num_targets, default=0)
        if group_size == 0 or self.num_queries // group_size == 0:
            return None
        num_groups = self.num_queries // group_size
        device, dtype = self.label_embed.weight.device, self.label_embed.weight.dtype
        labels = torch.cat([t["labels"] for t in targets]).to(device).repeat(num_groups)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype).repeat(num_groups, 1)
        if self.noise_scale > 0:
            flip = torch.rand(labels.shape, device=device) < self.noise_scale * 0.5
            labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
            # centre moves by up to lambda * half the size, size changes by up to lambda * size
            amplitude = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
            boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * amplitude * self.noise_scale).clamp(0.0, 1.0)

        batch = len(targets)
        image = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(num_targets)])
        slot = torch.cat([torch.arange(n, device=device) for n in num_targets])
        image = image.repeat(num_groups)
        slot = torch.cat([slot + g * group_size for g in range(num_groups)])
        dim = self.label_embed.embedding_dim
        content = torch.zeros(batch, num_groups * group_size, dim, device=device, dtype=dtype)
        box_logits = torch.zeros(batch, num_groups * group_size, 4, device=device, dtype=dtype)
        content[image, slot] = self.label_embed(labels)
        box_logits[image, slot] = inverse_sigmoid(boxes)
        return DenoisingQueries(content, box_logits, num_groups, group_size, num_targets)

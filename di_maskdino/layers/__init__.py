"""Reusable network blocks, the deformable attention layer and position encodings."""

from .activation_checkpointing import CheckpointedSequential, at_least_float32, checkpointed
from .blocks import (
    FFN,
    MLP,
    ConvNormAct,
    CrossAttentionBlock,
    DeformableAttentionBlock,
    NormLayer,
    SelfAttentionBlock,
    c2_xavier_fill,
    group_norm,
    with_pos,
    xavier_init_matrices,
)
from .ms_deform_attn import MSDeformAttn
from .position_encoding import (
    BoxPositionalQuery,
    box_position_embedding,
    feature_map_position_embedding,
    sine_features,
)

__all__ = [
    "MSDeformAttn",
    "MLP",
    "FFN",
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "DeformableAttentionBlock",
    "ConvNormAct",
    "NormLayer",
    "group_norm",
    "with_pos",
    "c2_xavier_fill",
    "xavier_init_matrices",
    "BoxPositionalQuery",
    "box_position_embedding",
    "feature_map_position_embedding",
    "sine_features",
    "checkpointed",
    "CheckpointedSequential",
    "at_least_float32",
]

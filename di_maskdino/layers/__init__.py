"""Reusable network blocks."""
from .blocks import FFN, MLP, ConvNormAct, CrossAttentionBlock, DeformableAttentionBlock, SelfAttentionBlock, c2_xavier_fill, with_pos, xavier_init_matrices
from .ms_deform_attn import MSDeformAttn
from .position_encoding import box_position_embedding, feature_map_position_embedding

__all__ = [
    "MSDeformAttn",
    "MLP",
    "FFN",
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "DeformableAttentionBlock",
    "ConvNormAct",
    "with_pos",
    "c2_xavier_fill",
    "xavier_init_matrices",
    "box_position_embedding",
    "feature_map_position_embedding",
]

"""The DI-MaskDINO network (model core: needs torch, torchvision, fvcore, scipy, numpy only)."""
from .backbone import FeatureSpec, TimmBackbone
from .bato import BalanceAwareTokensOptimization, GuidingTokens
from .de_imbalance import DeImbalance, TokenInteraction, select_top_k
from .decoder import DeformableDecoder
from .denoising import DenoisingGenerator, DenoisingQueries, denoising_attention_mask
from .encoder import EncoderOutput, MaskDINOEncoder
from .head import GUIDANCE_SOURCES, DIMaskDINOHead
from .heads import PredictionHeads
from .model import DIMaskDINO, pad_images
from .outputs import DenoisingOutput, DIMaskDINOOutput, Predictions
from .postprocess import Instances, instance_inference
from .query_selection import QuerySelection

__all__ = [
    "DIMaskDINO",
    "DIMaskDINOHead",
    "MaskDINOEncoder",
    "EncoderOutput",
    "QuerySelection",
    "DeImbalance",
    "TokenInteraction",
    "BalanceAwareTokensOptimization",
    "GuidingTokens",
    "DeformableDecoder",
    "DenoisingGenerator",
    "DenoisingQueries",
    "denoising_attention_mask",
    "PredictionHeads",
    "Predictions",
    "DenoisingOutput",
    "DIMaskDINOOutput",
    "Instances",
    "instance_inference",
    "TimmBackbone",
    "FeatureSpec",
    "GUIDANCE_SOURCES",
    "select_top_k",
    "pad_images",
]

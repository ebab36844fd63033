"""The DI-MaskDINO network (model core: needs torch, torchvision, fvcore, scipy, numpy only).

One module per part of the paper (Sec. 3.2): `encoder` (feature tokens extractor),
`query_selection` (first selection, Eq. 1), `de_imbalance` (Eq. 2-3), `decoder` (Q_bal,
Eq. 4; Eq. 9), `bato` (Eq. 5-8), `prediction_heads` (Eq. 10-11); `di_maskdino_head`
composes them, `architecture` builds them from one description and `objective` the losses.
"""

from .architecture import (
    ActivationCheckpointing,
    Architecture,
    BATOSpec,
    BoxMaskHeadSpec,
    DeImbalanceSpec,
    DenoisingSpec,
    EncoderSpec,
    SpecError,
    build_box_mask_head,
    build_encoder,
    build_head,
    build_model,
    build_parts,
)
from .backbone import FeatureSpec, TimmBackbone
from .bato import (
    GUIDANCE_SOURCES,
    BalanceAwareQueryGuidance,
    BalanceAwareTokensOptimization,
    GuidanceSource,
    GuidingTokens,
    MaskBoxGuidingTokens,
    QueryGuidingTokens,
    TokenSetGuidance,
    guidance_source,
)
from .box_mask_criterion import BoxMaskCriterion, BoxMatches
from .box_mask_head import BoxHeadFeatures, BoxMaskHead, BoxMasks, MaskQualityHead
from .de_imbalance import DeImbalance, TokenInteraction
from .decoder import DecoderOutput, DeformableDecoder
from .denoising import DenoisingGenerator, DenoisingQueries, denoising_attention_mask
from .di_maskdino_head import DIMaskDINOHead
from .encoder import EncoderOutput, MaskDINOEncoder
from .feature_tokens import FeatureTokens
from .model import PIXEL_MEAN, PIXEL_STD, TEST_MASKS, DIMaskDINO, pad_images
from .objective import BoxMaskObjective, MatchingCosts, Objective, build_box_mask_criterion, build_criterion
from .outputs import DenoisingOutput, DIMaskDINOOutput, Predictions, RawDetections
from .postprocess import (
    Detections,
    box_mask_detections,
    detections_from_raw,
    instance_inference,
    paste_box_masks,
    paste_masks,
    top_pairs,
)
from .prediction_heads import PredictionHeads
from .query_selection import QuerySelection, SelectedTokens, TokenSet, select_top_k
from .segmentation_inference import (
    PanopticSegmentation,
    Segment,
    SegmentationInference,
    SegmentationResult,
    panoptic_inference,
    predict_segmentation,
    resize_mask_logits,
    semantic_inference,
    thing_detections,
)
from .timm_vit import TimmViT, probe_vit

__all__ = [
    "SpecError",
    "Architecture",
    "ActivationCheckpointing",
    "EncoderSpec",
    "DeImbalanceSpec",
    "BATOSpec",
    "DenoisingSpec",
    "BoxMaskHeadSpec",
    "build_encoder",
    "build_box_mask_head",
    "build_head",
    "build_model",
    "build_parts",
    "Objective",
    "MatchingCosts",
    "BoxMaskObjective",
    "build_criterion",
    "build_box_mask_criterion",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "TEST_MASKS",
    "DIMaskDINO",
    "DIMaskDINOHead",
    "MaskDINOEncoder",
    "EncoderOutput",
    "FeatureTokens",
    "QuerySelection",
    "SelectedTokens",
    "TokenSet",
    "select_top_k",
    "DeImbalance",
    "TokenInteraction",
    "BalanceAwareTokensOptimization",
    "GuidingTokens",
    "GuidanceSource",
    "BalanceAwareQueryGuidance",
    "TokenSetGuidance",
    "guidance_source",
    "GUIDANCE_SOURCES",
    "MaskBoxGuidingTokens",
    "QueryGuidingTokens",
    "DeformableDecoder",
    "DecoderOutput",
    "DenoisingGenerator",
    "DenoisingQueries",
    "denoising_attention_mask",
    "PredictionHeads",
    "Predictions",
    "DenoisingOutput",
    "DIMaskDINOOutput",
    "RawDetections",
    "Detections",
    "instance_inference",
    "detections_from_raw",
    "paste_masks",
    "top_pairs",
    "paste_box_masks",
    "box_mask_detections",
    "BoxMaskHead",
    "BoxHeadFeatures",
    "BoxMasks",
    "MaskQualityHead",
    "BoxMaskCriterion",
    "BoxMatches",
    "Segment",
    "PanopticSegmentation",
    "SegmentationResult",
    "SegmentationInference",
    "panoptic_inference",
    "semantic_inference",
    "resize_mask_logits",
    "thing_detections",
    "predict_segmentation",
    "TimmBackbone",
    "TimmViT",
    "probe_vit",
    "FeatureSpec",
    "pad_images",
]

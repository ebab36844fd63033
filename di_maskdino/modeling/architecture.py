"""One description of a DI-MaskDINO (or MaskDINO) network, and the functions that build it.

`Architecture` holds every size and every optional part; detectron2's configuration
(`di_maskdino.d2.config.architecture_from_config`), the release converter
(`di_maskdino.release_conversion.infer_architecture`) and the release comparison
(`tools/compare_with_release.py`) all describe a model with it, and `build_encoder`,
`build_head` and `build_model` are the only places that turn a description into modules.

An optional part is a spec or None: `de_imbalance=None` and `bato=None` describe MaskDINO;
`box_mask_head=BoxMaskHeadSpec()` adds the box-conditioned mask head (refined masks).
`checkpointing` says which parts trade time for memory in training (activation
checkpointing); it changes no result.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from torch import nn

from ..layers import group_norm
from .backbone import FeatureSpec, enable_backbone_checkpointing
from .bato import BalanceAwareTokensOptimization, MaskBoxGuidingTokens, QueryGuidingTokens, guidance_source
from .box_mask_head import BoxMaskHead, MaskQualityHead
from .de_imbalance import DeImbalance
from .decoder import DeformableDecoder
from .denoising import DenoisingGenerator
from .di_maskdino_head import DIMaskDINOHead
from .encoder import MaskDINOEncoder
from .model import DIMaskDINO
from .prediction_heads import PredictionHeads
from .query_selection import QuerySelection

__all__ = [
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
]


@dataclass(frozen=True)
class EncoderSpec:
    """The MaskDINO encoder (MODEL.DI_MASKDINO.ENCODER)."""

    in_features: Tuple[str, ...] = ("res3", "res4", "res5")
    num_layers: int = 6
    ffn_dim: int = 2048
    num_points: int = 4
    common_stride: int = 4


@dataclass(frozen=True)
class DeImbalanceSpec:
    """The De-Imbalance module (MODEL.DI_MASKDINO.DE_IMBALANCE).

    selection_sizes: (k1, k2) for the paper's double selection, (k1, k2, k3) for three
    selections (Tab. 7), (k,) for a single selection followed by token interaction; the last
    size is the number of decoder queries.
    """

    selection_sizes: Tuple[int, ...] = (600, 300)
    token_interaction_layers: int = 2


@dataclass(frozen=True)
class BATOSpec:
    """Balance-Aware Tokens Optimization (MODEL.DI_MASKDINO.BATO)."""

    guidance_source: str = "Q_bal"  # Tab. 5: T_i, T_s1, T_s2 or Q_bal
    generate_guiding_tokens: bool = True  # Tab. 6
    num_guiding_tokens: int = 50


@dataclass(frozen=True)
class DenoisingSpec:
    """Denoising queries (MODEL.DI_MASKDINO.DN)."""

    num_queries: int = 100
    noise_scale: float = 0.4


@dataclass(frozen=True)
class ActivationCheckpointing:
    """Parts that run under activation checkpointing in training
    (MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING): they keep only their inputs in the forward
    pass and compute their activations again in backward. Losses and gradients are the same
    with and without; each switch lowers the peak memory of a training step and costs time
    (see tools/benchmark_memory.py).

    backbone: each of detectron2's ResNet stages (res2..res5), or the timm backbone's own
        gradient checkpointing; BatchNorm that updates running statistics is refused.
    encoder: every deformable encoder layer, and the FPN making the mask features.
    token_interaction: every token-interaction layer of the De-Imbalance module.
    decoder: every decoder layer, and BATO (it runs inside the decoder loop).
    """

    backbone: bool = False
    encoder: bool = False
    token_interaction: bool = False
    decoder: bool = False


@dataclass(frozen=True)
class BoxMaskHeadSpec:
    """The box-conditioned mask head (MODEL.DI_MASKDINO.BOX_MASK_HEAD; modeling/box_mask_head.py).

    fine_feature: a backbone map fused into the box features (e.g. "res2"), "image" for the
        normalised input image itself (stride 1), or None.
    mask_quality: add the mask-quality (predicted IoU) branch.
    """

    hidden_dim: int = 128
    roi_size: int = 28
    mask_size: int = 56
    image_encoder_layers: int = 1
    box_encoder_layers: int = 4
    fine_feature: Optional[str] = None
    mask_prior: bool = True
    box_expansion: float = 1.0
    mask_quality: bool = True


@dataclass(frozen=True)
class Architecture:
    """Every size and part of the network; defaults are the paper's R50 model.

    num_queries: decoder queries (NUM_OBJECT_QUERIES); with the De-Imbalance module it must
    be the last selection size, without it the first selection keeps this many tokens.
    num_groups: GroupNorm groups of the encoder and BATO convolutions.
    random_position_token: Tab. 3's position-token constraint (random reference boxes).
    checkpointing: activation checkpointing in training (memory for time; no part's result
    changes).
    mask_branch: False makes a detection-only model: no mask features, no mask
        predictions, no mask losses (boxes and classes only). Its initial boxes are then the
        encoder's predicted boxes (mask_enhanced_boxes must be False); with BATO, the mask
        guiding tokens are still the mask embeddings of the selected queries (Eq. 5) and
        there are no mask features to update.
    """

    num_classes: int = 80
    hidden_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_levels: int = 4
    num_points: int = 4
    num_queries: int = 300
    num_decoder_layers: int = 6
    mask_enhanced_boxes: bool = True
    num_groups: int = 32
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    de_imbalance: Optional[DeImbalanceSpec] = field(default_factory=DeImbalanceSpec)
    bato: Optional[BATOSpec] = field(default_factory=BATOSpec)
    denoising: Optional[DenoisingSpec] = field(default_factory=DenoisingSpec)
    random_position_token: bool = False
    checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    mask_branch: bool = True
    box_mask_head: Optional[BoxMaskHeadSpec] = None

    def __post_init__(self):
        checks = [
            (self.num_classes >= 1, f"num_classes must be at least 1, got {self.num_classes}"),
            (self.num_queries >= 1, f"num_queries must be at least 1, got {self.num_queries}"),
            (self.num_decoder_layers >= 1, f"num_decoder_layers must be at least 1, got {self.num_decoder_layers}"),
            (
                self.hidden_dim % self.num_heads == 0,
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})",
            ),
            (self.mask_dim >= 1, f"mask_dim must be at least 1, got {self.mask_dim}"),
            (
                self.hidden_dim % self.num_groups == 0,
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_groups ({self.num_groups})",
            ),
            (
                self.mask_branch or not self.mask_enhanced_boxes,
                "a detection-only model (no mask branch) cannot initialise its boxes from masks: set "
                "mask_enhanced_boxes=False (MODEL.DI_MASKDINO.MASK_ENHANCED_BOXES False)",
            ),
            (
                self.mask_branch or self.box_mask_head is None or not self.box_mask_head.mask_prior,
                "the box mask head's mask prior is the detector's own mask, which a detection-only model "
                "(no mask branch) does not make: set MODEL.DI_MASKDINO.BOX_MASK_HEAD.MASK_PRIOR False or "
                "MODEL.MASK_ON True",
            ),
        ]
        if self.de_imbalance is not None:
            sizes = tuple(self.de_imbalance.selection_sizes)
            checks.append(
                (
                    len(sizes) > 0 and sizes[-1] == self.num_queries,
                    f"the last selection size must equal num_queries ({self.num_queries}), got {list(sizes)}",
                )
            )
            checks.append(
                (
                    all(a >= b for a, b in zip(sizes, sizes[1:])),
                    f"selection sizes must not grow from one selection to the next, got {list(sizes)}",
                )
            )
        if self.box_mask_head is not None:
            spec = self.box_mask_head
            checks.append(
                (
                    spec.hidden_dim % self.num_groups == 0,
                    f"the box mask head's hidden_dim ({spec.hidden_dim}) must be divisible by num_groups "
                    f"({self.num_groups})",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DI-MaskDINO architecture: {message}")

    @property
    def first_selection_size(self) -> int:
        """k1: tokens kept by the first selection."""
        return self.de_imbalance.selection_sizes[0] if self.de_imbalance is not None else self.num_queries


def build_encoder(arch: Architecture, backbone_shapes: Dict[str, FeatureSpec]) -> MaskDINOEncoder:
    """The encoder for backbone maps of the given shapes (name -> an object with `channels`
    and `stride`, e.g. a backbone's `output_shape()`)."""
    spec = arch.encoder
    return MaskDINOEncoder(
        {name: shape.channels for name, shape in backbone_shapes.items()},
        {name: shape.stride for name, shape in backbone_shapes.items()},
        transformer_in_features=spec.in_features,
        hidden_dim=arch.hidden_dim,
        mask_dim=arch.mask_dim if arch.mask_branch else None,
        num_levels=arch.num_levels,
        num_layers=spec.num_layers,
        num_heads=arch.num_heads,
        num_points=spec.num_points,
        ffn_dim=spec.ffn_dim,
        dropout=arch.dropout,
        common_stride=spec.common_stride,
        norm_layer=group_norm(arch.num_groups),
        grad_checkpointing=arch.checkpointing.encoder,
    )


def build_de_imbalance(arch: Architecture) -> Optional[DeImbalance]:
    spec = arch.de_imbalance
    if spec is None:
        return None
    sizes = tuple(spec.selection_sizes)
    # NOTE: with a single selection (Tab. 7) token interaction still runs, keeping all tokens.
    later = sizes[1:] or sizes
    return DeImbalance(
        arch.hidden_dim,
        arch.num_heads,
        arch.ffn_dim,
        arch.dropout,
        spec.token_interaction_layers,
        later,
        grad_checkpointing=arch.checkpointing.token_interaction,
    )


def build_bato(arch: Architecture) -> Optional[BalanceAwareTokensOptimization]:
    spec = arch.bato
    if spec is None:
        return None
    return BalanceAwareTokensOptimization(
        arch.hidden_dim,
        arch.num_heads,
        arch.ffn_dim,
        arch.dropout,
        guidance=guidance_source(spec.guidance_source),
        generator=MaskBoxGuidingTokens() if spec.generate_guiding_tokens else QueryGuidingTokens(),
        num_guiding_tokens=spec.num_guiding_tokens,
        norm_layer=group_norm(arch.num_groups),
        update_mask_features=arch.mask_branch,
    )


def head_mask_dim(arch: Architecture) -> Optional[int]:
    """Output size of the mask-embedding head, or None when nothing needs it."""
    if arch.mask_branch:
        return arch.mask_dim
    # NOTE: without the mask branch, BATO's mask guiding tokens (Eq. 5) are still mask
    # embeddings, of the hidden size as BATO requires.
    if arch.bato is not None and arch.bato.generate_guiding_tokens:
        return arch.hidden_dim
    return None


def build_denoising(arch: Architecture) -> Optional[DenoisingGenerator]:
    spec = arch.denoising
    if spec is None:
        return None
    return DenoisingGenerator(arch.num_classes, arch.hidden_dim, spec.num_queries, spec.noise_scale)


def build_head(arch: Architecture) -> DIMaskDINOHead:
    """The head (selection, De-Imbalance, denoising, BATO, decoder, prediction heads)."""
    return DIMaskDINOHead(
        heads=PredictionHeads(arch.hidden_dim, arch.num_classes, head_mask_dim(arch)),
        query_selection=QuerySelection(arch.hidden_dim, arch.first_selection_size, arch.mask_enhanced_boxes),
        de_imbalance=build_de_imbalance(arch),
        denoising=build_denoising(arch),
        bato=build_bato(arch),
        decoder=DeformableDecoder(
            arch.hidden_dim,
            arch.num_heads,
            arch.ffn_dim,
            arch.dropout,
            arch.num_levels,
            arch.num_points,
            arch.num_decoder_layers,
            grad_checkpointing=arch.checkpointing.decoder,
        ),
        random_reference_boxes=arch.random_position_token,
    )


def build_box_mask_head(arch: Architecture, backbone_shapes: Dict[str, FeatureSpec]) -> Optional[BoxMaskHead]:
    """The box-conditioned mask head, or None; `backbone_shapes` gives the fused map's channels."""
    spec = arch.box_mask_head
    if spec is None:
        return None
    fine_channels = None
    if spec.fine_feature == "image":
        fine_channels = 3
    elif spec.fine_feature is not None:
        if spec.fine_feature not in backbone_shapes:
            raise ValueError(
                f"the box mask head fuses backbone map {spec.fine_feature!r}, which the backbone does not give; "
                f"it gives {sorted(backbone_shapes)} (or 'image', the input image)"
            )
        fine_channels = backbone_shapes[spec.fine_feature].channels
    return BoxMaskHead(
        mask_dim=arch.mask_dim,
        query_dim=arch.hidden_dim,
        dim=spec.hidden_dim,
        roi_size=spec.roi_size,
        mask_size=spec.mask_size,
        image_encoder_layers=spec.image_encoder_layers,
        box_encoder_layers=spec.box_encoder_layers,
        fine_channels=fine_channels,
        mask_prior=spec.mask_prior,
        box_expansion=spec.box_expansion,
        quality=MaskQualityHead(spec.hidden_dim) if spec.mask_quality else None,
        norm_layer=group_norm(arch.num_groups),
    )


def build_model(
    arch: Architecture,
    backbone: nn.Module,
    *,
    pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
    pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
    size_divisibility: int = 32,
    test_topk: int = 100,
) -> DIMaskDINO:
    """The whole network on `backbone` (any module with `output_shape()` giving channels and
    stride per map; with `arch.checkpointing.backbone` also `set_grad_checkpointing`, as
    `TimmBackbone` has)."""
    if arch.checkpointing.backbone:
        enable_backbone_checkpointing(backbone)
    shapes = backbone.output_shape()
    return DIMaskDINO(
        backbone,
        build_encoder(arch, shapes),
        build_head(arch),
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        size_divisibility=size_divisibility,
        test_topk=test_topk,
        box_mask_head=build_box_mask_head(arch, shapes),
        fine_feature=arch.box_mask_head.fine_feature if arch.box_mask_head is not None else None,
    )

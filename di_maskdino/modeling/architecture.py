"""One description of a DI-MaskDINO (or MaskDINO) network, and the functions that build it.

`Architecture` holds every size and every optional part; detectron2's configuration
(`di_maskdino.d2.config.architecture_from_config`), the release converter
(`di_maskdino.release_conversion.infer_architecture`) and the release comparison
(`dev/compare_with_release.py`) all describe a model with it, and `build_encoder`,
`build_head` and `build_model` are the only places that turn a description into modules.

An optional part is a spec or None: `de_imbalance=None` and `bato=None` describe MaskDINO;
`box_mask_head=BoxMaskHeadSpec()` adds the box-conditioned mask head (refined masks).
`checkpointing` says which parts trade time for memory in training (activation
checkpointing); it changes no result.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..layers import group_norm
from .backbone import FeatureSpec, enable_backbone_checkpointing
from .bato import (
    GUIDANCE_SOURCES,
    BalanceAwareTokensOptimization,
    MaskBoxGuidingTokens,
    QueryGuidingTokens,
    guidance_source,
)
from .box_mask_head import BoxMaskHead, MaskQualityHead
from .de_imbalance import DeImbalance
from .decoder import DeformableDecoder
from .denoising import DenoisingGenerator
from .di_maskdino_head import DIMaskDINOHead
from .encoder import MaskDINOEncoder
from .model import PIXEL_MEAN, PIXEL_STD, DIMaskDINO
from .prediction_heads import PredictionHeads
from .query_selection import QuerySelection

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
    "build_parts",
    "build_model",
]


class SpecError(ValueError):
    """A description (`Architecture`, `Objective`) with values that cannot work.

    `problems` lists (field, what its value must be) for every such field; the message shows
    them all. Other fields named in a requirement stand in backticks, so that a caller that
    reads the values from elsewhere (a config) can name its own keys for all of them."""

    def __init__(self, what: str, problems: Sequence[Tuple[str, str]]):
        self.problems = list(problems)
        lines = "\n".join(f"  {field}: must be {requirement}" for field, requirement in self.problems)
        super().__init__(f"{what}:\n{lines}")


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
    (see dev/benchmark_memory.py).

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
    mask_box_edges: the extent of a mask-enhanced initial box: "indices" (from the first to
        the last mask pixel's index, the release's "mask2box": DI-MaskDINO and MaskDINO R50)
        or "pixels" (the pixels' outer edges, one pixel wider and taller, the release's
        "bitmask": MaskDINO's Swin-L instance model).
    padding_mask: make the padded region of a batch invisible to its images (`padding.py`,
        MODEL.DI_MASKDINO.PADDING_MASK): predictions then do not depend on the rest of the
        batch, and boxes are normalised by each image. Off in the release's configurations.
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
    mask_box_edges: str = "indices"
    num_groups: int = 32
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    de_imbalance: Optional[DeImbalanceSpec] = field(default_factory=DeImbalanceSpec)
    bato: Optional[BATOSpec] = field(default_factory=BATOSpec)
    denoising: Optional[DenoisingSpec] = field(default_factory=DenoisingSpec)
    random_position_token: bool = False
    checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    mask_branch: bool = True
    box_mask_head: Optional[BoxMaskHeadSpec] = None
    padding_mask: bool = False

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise SpecError("DI-MaskDINO architecture", problems)

    def problems(self) -> List[Tuple[str, str]]:
        """(field, what its value must be) for every field whose value cannot work, all of
        them (nested fields as "encoder.num_layers")."""
        rules = [
            ("num_classes", self.num_classes >= 1, "at least 1 (the number of categories of the dataset)"),
            ("hidden_dim", self.hidden_dim >= 1, "at least 1"),
            ("num_heads", self.num_heads >= 1, "at least 1"),
            (
                "hidden_dim",
                self.num_heads < 1 or self.hidden_dim % self.num_heads == 0,
                f"divisible by `num_heads` ({self.num_heads})",
            ),
            ("num_groups", self.num_groups >= 1, "at least 1"),
            (
                "hidden_dim",
                self.num_groups < 1 or self.hidden_dim % self.num_groups == 0,
                f"divisible by `num_groups` ({self.num_groups}, GroupNorm groups)",
            ),
            ("mask_dim", self.mask_dim >= 1, "at least 1"),
            ("ffn_dim", self.ffn_dim >= 1, "at least 1"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("num_queries", self.num_queries >= 1, "at least 1"),
            ("num_decoder_layers", self.num_decoder_layers >= 1, "at least 1"),
            ("num_points", self.num_points >= 1, "at least 1"),
            (
                "num_levels",
                self.num_levels >= len(self.encoder.in_features),
                f"at least the number of `encoder.in_features` ({len(self.encoder.in_features)})",
            ),
            ("encoder.in_features", len(self.encoder.in_features) >= 1, "at least one backbone map"),
            ("encoder.num_layers", self.encoder.num_layers >= 0, "at least 0"),
            ("encoder.ffn_dim", self.encoder.ffn_dim >= 1, "at least 1"),
            ("encoder.num_points", self.encoder.num_points >= 1, "at least 1"),
            ("encoder.common_stride", self.encoder.common_stride >= 1, "at least 1"),
            ("mask_box_edges", self.mask_box_edges in ("indices", "pixels"), '"indices" or "pixels"'),
            (
                "mask_enhanced_boxes",
                self.mask_branch or not self.mask_enhanced_boxes,
                "False in a detection-only model (`mask_branch` False): it has no masks to initialise boxes from",
            ),
        ]
        if self.de_imbalance is not None:
            sizes = tuple(self.de_imbalance.selection_sizes)
            rules += [
                (
                    "de_imbalance.selection_sizes",
                    len(sizes) >= 1 and sizes[-1] == self.num_queries,
                    f"a list ending with `num_queries` ({self.num_queries})",
                ),
                (
                    "de_imbalance.selection_sizes",
                    all(s >= 1 for s in sizes) and all(a >= b for a, b in zip(sizes, sizes[1:])),
                    "positive sizes that do not grow from one selection to the next",
                ),
                (
                    "de_imbalance.token_interaction_layers",
                    self.de_imbalance.token_interaction_layers >= 1,
                    "at least 1",
                ),
            ]
        if self.bato is not None:
            rules += self._bato_problems()
        if self.padding_mask:
            checkpointed = [name for name in ("backbone", "encoder", "decoder") if getattr(self.checkpointing, name)]
            rules += [
                (
                    "padding_mask",
                    not checkpointed,
                    f"False with activation checkpointing of the {', '.join(checkpointed)} (the padding mask's "
                    "convolutions are not recomputed with it); turn one of them off",
                ),
                ("padding_mask", self.box_mask_head is None, "False with a box mask head (it does not cover it)"),
            ]
        if self.denoising is not None:
            rules += [
                ("denoising.num_queries", self.denoising.num_queries >= 1, "at least 1"),
                ("denoising.noise_scale", self.denoising.noise_scale >= 0, "at least 0"),
            ]
        if self.box_mask_head is not None:
            head = self.box_mask_head
            rules += [
                (
                    "box_mask_head.hidden_dim",
                    self.num_groups < 1 or head.hidden_dim % self.num_groups == 0,
                    f"divisible by `num_groups` ({self.num_groups})",
                ),
                (
                    "box_mask_head.mask_prior",
                    self.mask_branch or not head.mask_prior,
                    "False in a detection-only model (`mask_branch` False): the prior is the detector's own mask",
                ),
            ]
        return [(field, requirement) for field, ok, requirement in rules if not ok]

    def _bato_problems(self) -> List[Tuple[str, bool, str]]:
        bato = self.bato
        rules = [
            ("bato.guidance_source", bato.guidance_source in GUIDANCE_SOURCES, f"one of {', '.join(GUIDANCE_SOURCES)}"),
            ("bato.num_guiding_tokens", bato.num_guiding_tokens >= 1, "at least 1"),
            (
                "mask_dim",
                not (bato.generate_guiding_tokens and self.mask_branch) or self.mask_dim == self.hidden_dim,
                f"equal to `hidden_dim` ({self.hidden_dim}) when BATO generates its guiding tokens from mask "
                "embeddings (`bato.generate_guiding_tokens`)",
            ),
        ]
        if bato.guidance_source in GUIDANCE_SOURCES:
            source = guidance_source(bato.guidance_source)
            rules += [
                (
                    "bato.guidance_source",
                    source.name != "T_s2" or self.de_imbalance is not None,
                    "other than T_s2 without the De-Imbalance module (it makes T_s2)",
                ),
                (
                    "num_decoder_layers",
                    source.layer < self.num_decoder_layers,
                    f"more than {source.layer}: BATO guided by {source.name} runs before decoder layer {source.layer}",
                ),
            ]
        return rules

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
        query_selection=QuerySelection(
            arch.hidden_dim, arch.first_selection_size, arch.mask_enhanced_boxes, arch.mask_box_edges
        ),
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


def build_parts(arch: Architecture, backbone_shapes: Dict[str, FeatureSpec]) -> Dict[str, Any]:
    """The parts of `DIMaskDINO` an architecture makes on a backbone whose maps have these
    shapes: {"encoder", "head", "box_mask_head", "fine_feature"} (keyword arguments of
    `DIMaskDINO`). `build_model` and detectron2's meta-architecture both build from it."""
    return {
        "encoder": build_encoder(arch, backbone_shapes),
        "head": build_head(arch),
        "box_mask_head": build_box_mask_head(arch, backbone_shapes),
        "fine_feature": arch.box_mask_head.fine_feature if arch.box_mask_head is not None else None,
        "padding_mask": arch.padding_mask,
    }


def build_model(
    arch: Architecture,
    backbone: nn.Module,
    *,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
    size_divisibility: int = 32,
    test_topk: int = 100,
    **kwargs,
) -> DIMaskDINO:
    """The whole network on `backbone` (any module with `output_shape()` giving channels and
    stride per map; with `arch.checkpointing.backbone` also `set_grad_checkpointing`, as
    `TimmBackbone` has). `kwargs`: further `DIMaskDINO` arguments (`test_masks`,
    `segmentation`)."""
    if arch.checkpointing.backbone:
        enable_backbone_checkpointing(backbone)
    return DIMaskDINO(
        backbone,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        size_divisibility=size_divisibility,
        test_topk=test_topk,
        **build_parts(arch, backbone.output_shape()),
        **kwargs,
    )

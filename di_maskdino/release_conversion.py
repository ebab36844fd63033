"""Conversion of the authors' released checkpoints (MaskDINO and DI-MaskDINO, detectron2
format) to this project's parameter names.

The release registers some modules under several names (the shared class, box and mask
heads, the decoder norm, the token-interaction box head, BATO); each such group maps to a
single parameter here, after checking that the copies are identical. A few entries are
known to carry no weights of the network (`criterion.empty_weight`) and are dropped. The
Swin releases' relative-position indices are buffers our model computes from the window size:
each is checked against that and left out.
"""

import re
from typing import Dict, Iterable, List, Tuple

import torch

from .modeling.architecture import Architecture, BATOSpec, DeImbalanceSpec, DenoisingSpec, EncoderSpec
from .modeling.backbone import FeatureSpec

__all__ = [
    "RELEASED",
    "matching_release",
    "convert_release_state_dict",
    "check_against_model",
    "infer_architecture",
    "ConversionError",
    "RELEASE_RULES",
    "DROPPED_RELEASE_KEYS",
    "RELEASE_TASKS",
    "release_task",
    "release_backbone",
    "infer_swin",
    "convert_swin_classification_state_dict",
]

_P = r"sem_seg_head\.pixel_decoder\."
_H = r"sem_seg_head\.predictor\."

# (release pattern, our name); the first matching rule wins. \g<n> refers to groups.
RELEASE_RULES: List[Tuple[str, str]] = [
    # MaskDINO's Swin backbone -> SwinBackbone (timm's Swin as body.*). NOTE: the release
    # keeps a stage's patch merging at the end of the stage, timm at the start of the next.
    (r"backbone\.patch_embed\.(.+)", r"backbone.body.patch_embed.\1"),
    (r"backbone\.layers\.(\d+)\.blocks\.(.+)", r"backbone.body.layers_\1.blocks.\2"),
    (r"backbone\.layers\.0\.downsample\.(.+)", r"backbone.body.layers_1.downsample.\1"),
    (r"backbone\.layers\.1\.downsample\.(.+)", r"backbone.body.layers_2.downsample.\1"),
    (r"backbone\.layers\.2\.downsample\.(.+)", r"backbone.body.layers_3.downsample.\1"),
    (r"backbone\.norm(\d)\.(weight|bias)", r"backbone.output_norms.\1.\2"),
    # detectron2's ResNet: the same names
    (r"backbone\.(.+)", r"backbone.\1"),
    # encoder
    (_P + r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"encoder.input_proj.\1.\2.\3"),
    (_P + r"transformer\.level_embed", r"encoder.level_embed"),
    (_P + r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)", r"encoder.layers.\1.self_attn.attn.\2"),
    (_P + r"transformer\.encoder\.layers\.(\d+)\.norm1\.(.+)", r"encoder.layers.\1.self_attn.norm.\2"),
    (_P + r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.(.+)", r"encoder.layers.\1.ffn.linear\2.\3"),
    (_P + r"transformer\.encoder\.layers\.(\d+)\.norm2\.(.+)", r"encoder.layers.\1.ffn.norm.\2"),
    (_P + r"mask_features\.(.+)", r"encoder.mask_features.\1"),
    # NOTE: adapter_k / layer_k are numbered from the finest map; ours from the coarsest.
    # Released models have one FPN level, where both give index 0.
    (_P + r"adapter_1\.weight", r"encoder.lateral_convs.0.conv.weight"),
    (_P + r"adapter_1\.norm\.(.+)", r"encoder.lateral_convs.0.norm.\1"),
    (_P + r"layer_1\.weight", r"encoder.output_convs.0.conv.weight"),
    (_P + r"layer_1\.norm\.(.+)", r"encoder.output_convs.0.norm.\1"),
    # query selection (two-stage)
    (_H + r"enc_output\.(.+)", r"head.query_selection.memory_proj.\1"),
    (_H + r"enc_output_norm\.(.+)", r"head.query_selection.memory_norm.\1"),
    # shared prediction heads
    (_H + r"(?:decoder\.|oldm\.)?class_embed\.(.+)", r"head.heads.class_embed.\1"),
    (_H + r"(?:_bbox_embed|bbox_embed\.\d+|decoder\.bbox_embed\.\d+)\.(.+)", r"head.heads.box_embed.\1"),
    (_H + r"(?:decoder\.)?mask_embed\.(.+)", r"head.heads.mask_embed.\1"),
    (_H + r"(?:decoder_norm|decoder\.norm)\.(.+)", r"head.heads.norm.\1"),
    (_H + r"label_enc\.(.+)", r"head.denoising.label_embed.\1"),
    # De-Imbalance module ("oldm" in the release): one stage
    (_H + r"(?:oldm_norm|oldm\.norm)\.(.+)", r"head.de_imbalance.stages.0.norm.\1"),
    (
        _H + r"(?:_oldm_bbox_embed|oldm_bbox_embed\.\d+|oldm\.bbox_embed\.\d+)\.(.+)",
        r"head.de_imbalance.stages.0.box_embed.\1",
    ),
    (_H + r"oldm\.ref_point_head\.(.+)", r"head.de_imbalance.stages.0.ref_point_head.\1"),
    (_H + r"oldm\.layers\.(\d+)\.self_attn\.(.+)", r"head.de_imbalance.stages.0.layers.\1.self_attn.attn.\2"),
    (_H + r"oldm\.layers\.(\d+)\.norm1\.(.+)", r"head.de_imbalance.stages.0.layers.\1.self_attn.norm.\2"),
    (_H + r"oldm\.layers\.(\d+)\.linear([12])\.(.+)", r"head.de_imbalance.stages.0.layers.\1.ffn.linear\2.\3"),
    (_H + r"oldm\.layers\.(\d+)\.norm2\.(.+)", r"head.de_imbalance.stages.0.layers.\1.ffn.norm.\2"),
    # BATO ("query_guide_feature_update" and the decoder's "mask_output_conv")
    (_H + r"(?:decoder\.)?query_guide_feature_update\.multihead_attn\.(.+)", r"head.bato.cross_attn.attn.\1"),
    (_H + r"(?:decoder\.)?query_guide_feature_update\.norm1\.(.+)", r"head.bato.cross_attn.norm.\1"),
    (_H + r"(?:decoder\.)?query_guide_feature_update\.linear([12])\.(.+)", r"head.bato.ffn.linear\1.\2"),
    (_H + r"(?:decoder\.)?query_guide_feature_update\.norm2\.(.+)", r"head.bato.ffn.norm.\1"),
    (_H + r"decoder\.mask_output_conv\.weight", r"head.bato.mask_feature_conv.conv.weight"),
    (_H + r"decoder\.mask_output_conv\.norm\.(.+)", r"head.bato.mask_feature_conv.norm.\1"),
    # decoder
    (_H + r"decoder\.ref_point_head\.(.+)", r"head.decoder.ref_point_head.\1"),
    (_H + r"decoder\.layers\.(\d+)\.self_attn\.(.+)", r"head.decoder.layers.\1.self_attn.attn.\2"),
    (_H + r"decoder\.layers\.(\d+)\.norm2\.(.+)", r"head.decoder.layers.\1.self_attn.norm.\2"),
    (_H + r"decoder\.layers\.(\d+)\.cross_attn\.(.+)", r"head.decoder.layers.\1.cross_attn.attn.\2"),
    (_H + r"decoder\.layers\.(\d+)\.norm1\.(.+)", r"head.decoder.layers.\1.cross_attn.norm.\2"),
    (_H + r"decoder\.layers\.(\d+)\.linear([12])\.(.+)", r"head.decoder.layers.\1.ffn.linear\2.\3"),
    (_H + r"decoder\.layers\.(\d+)\.norm3\.(.+)", r"head.decoder.layers.\1.ffn.norm.\2"),
]

# Entries of the released state dicts that are not weights of the network.
DROPPED_RELEASE_KEYS = {
    "criterion.empty_weight": "the release's no-object class weight; sigmoid focal loss does not use it",
    "pixel_mean": "input normalisation comes from the configuration",
    "pixel_std": "input normalisation comes from the configuration",
}

_COMPILED_RULES = [(re.compile(pattern + r"$"), target) for pattern, target in RELEASE_RULES]

# Buffers of the release that our model derives from its configuration instead of storing:
# each is checked against the value our model computes, then left out.
_DERIVED_INDEX = re.compile(r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$")


def _check_relative_position_index(key: str, value: torch.Tensor, state_dict: Dict[str, torch.Tensor]) -> str:
    """'' when a released Swin block's relative-position index is the one timm's Swin computes
    for the block's window (read from its bias table, (2w - 1)^2 rows); else what differs."""
    from timm.models.swin_transformer import get_relative_position_index

    table = state_dict.get(key.replace("relative_position_index", "relative_position_bias_table"))
    if table is None:
        return f"{key} has no relative_position_bias_table beside it"
    window = (round(table.shape[0] ** 0.5) + 1) // 2
    expected = get_relative_position_index(window, window)
    if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
        return f"{key} is not the relative-position index of a {window} x {window} window"
    return ""


class ConversionError(ValueError):
    """A released checkpoint does not fit: lists every key that did not map or disagreed."""


def _target_name(key: str) -> str:
    for pattern, target in _COMPILED_RULES:
        match = pattern.match(key)
        if match:
            return match.expand(target)
    return ""


def convert_release_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Maps a released `model` state dict to this project's names.

    Raises ConversionError listing every key that no rule maps, and every group of shared
    release entries whose copies differ.
    """
    converted: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    unmapped, conflicting = [], []
    for key, value in state_dict.items():
        if key in DROPPED_RELEASE_KEYS:
            continue
        if _DERIVED_INDEX.match(key):
            problem = _check_relative_position_index(key, value, state_dict)
            if problem:
                conflicting.append(problem)
            continue
        target = _target_name(key)
        if not target:
            unmapped.append(key)
            continue
        if target in converted:
            if converted[target].shape != value.shape or not torch.equal(converted[target], value):
                conflicting.append(f"{key} differs from {sources[target]} (both map to {target})")
            continue
        converted[target] = value
        sources[target] = key
    if unmapped or conflicting:
        lines = [f"  unmapped: {k}" for k in unmapped] + [f"  conflict: {c}" for c in conflicting]
        raise ConversionError("the checkpoint does not fit this project's model:\n" + "\n".join(lines))
    return converted


def check_against_model(
    converted: Dict[str, torch.Tensor], expected: Dict[str, Iterable[int]], skip_prefixes=()
) -> None:
    """Raises ConversionError unless `converted` has exactly the names and shapes of
    `expected` (name -> shape), ignoring names that start with one of `skip_prefixes`."""

    def keep(name):
        return not any(name.startswith(p) for p in skip_prefixes)

    ours = {k: tuple(v) for k, v in expected.items() if keep(k)}
    theirs = {k: tuple(v.shape) for k, v in converted.items() if keep(k)}
    lines = [f"  missing from the checkpoint: {k} {ours[k]}" for k in sorted(set(ours) - set(theirs))]
    lines += [f"  not in the model: {k} {theirs[k]}" for k in sorted(set(theirs) - set(ours))]
    lines += [
        f"  shape mismatch: {k} checkpoint {theirs[k]} vs model {ours[k]}"
        for k in sorted(set(ours) & set(theirs))
        if ours[k] != theirs[k]
    ]
    if lines:
        raise ConversionError("the converted checkpoint does not fit the model:\n" + "\n".join(lines))


# Entries of an ImageNet Swin classification checkpoint that the detection backbone does not
# hold (by suffix or prefix), and why.
_CLASSIFICATION_ONLY = (
    ("head.", "the classification head"),
    ("norm.", "the final norm before the classification head (the backbone normalises each map instead)"),
)


def convert_swin_classification_state_dict(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Maps an ImageNet Swin classification checkpoint (Microsoft's layout, as MaskDINO's
    `swin_large_patch4_window12_384_22k` files, or timm's) to `SwinBackbone`'s names under
    `backbone.` (body.*), for MODEL.WEIGHTS of a build_swin_backbone config.

    Returns (converted, dropped), dropped naming each left-out entry and why: the
    classification head and final norm, the attention masks (computed for each input size),
    and the relative-position indices (checked against the window size first). The per-map
    output norms, which such a checkpoint lacks, are added at their initialisation (weight 1,
    bias 0), as in MaskDINO's training. Raises ConversionError listing every entry that does
    not map."""
    timm_layout = any(k.startswith("layers.3.downsample.") for k in state_dict)
    converted: Dict[str, torch.Tensor] = {}
    dropped: Dict[str, str] = {}
    problems: List[str] = []
    for key, value in state_dict.items():
        reason = next((why for prefix, why in _CLASSIFICATION_ONLY if key.startswith(prefix)), "")
        if reason:
            dropped[key] = reason
        elif key.endswith(".attn_mask"):
            dropped[key] = "the shifted-window mask, computed for each input size"
        elif key.endswith(".attn.relative_position_index"):
            problem = _check_relative_position_index(key, value, state_dict)
            if problem:
                problems.append(f"  conflict: {problem}")
            dropped[key] = "the relative-position index, computed from the window size (checked equal)"
        else:
            if timm_layout:
                target = "backbone.body." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", key)
            else:
                target = _target_name("backbone." + key)
            if not target.startswith("backbone.body."):
                problems.append(f"  unmapped: {key}")
                continue
            converted[target] = value
    if problems:
        raise ConversionError("the checkpoint is not a Swin classification checkpoint:\n" + "\n".join(problems))
    # NOTE: the per-map output norms are not in a classification checkpoint; they are written
    # at a LayerNorm's initialisation (weight 1, bias 0), the values MaskDINO's training starts
    # them from, so that the file initialises the whole backbone (MODEL.WEIGHTS).
    channels = converted["backbone.body.patch_embed.proj.weight"].shape[0]
    for stage in range(4):
        dtype = converted["backbone.body.patch_embed.proj.weight"].dtype
        converted[f"backbone.output_norms.{stage}.weight"] = torch.ones(channels << stage, dtype=dtype)
        converted[f"backbone.output_norms.{stage}.bias"] = torch.zeros(channels << stage, dtype=dtype)
    return converted, dropped


def _count(names: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for m in map(regex.match, names) if m})


# The task of a released MaskDINO / DI-MaskDINO model, read from its number of classes (the
# only trace the task leaves in the weights), and the config of this project to evaluate it.
RELEASE_TASKS = {
    80: ("coco_instance", ""),
    133: ("coco_panoptic", "configs/coco/panoptic/maskdino_r50_50ep.yaml"),
}


def release_task(num_classes: int) -> str:
    """The task of a release with `num_classes` classes: "coco_instance" (80), "coco_panoptic"
    (133: 80 things + 53 stuff) or "unknown"."""
    return RELEASE_TASKS.get(num_classes, ("unknown", ""))[0]


def release_backbone(converted: Dict[str, torch.Tensor]) -> str:
    """The backbone of a converted checkpoint: "swin" (MaskDINO's Swin, now `SwinBackbone`'s
    names) or "resnet" (detectron2's ResNet)."""
    return "swin" if any(k.startswith("backbone.body.layers_") for k in converted) else "resnet"


def infer_swin(converted: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The timm Swin sizes of a converted Swin checkpoint, as keyword arguments of
    `timm.create_model` (embed_dim, depths, num_heads, window_size)."""
    names = list(converted)
    depths = tuple(_count(names, rf"backbone\.body\.layers_{i}\.blocks\.(\d+)\.") for i in range(4))
    tables = [converted[f"backbone.body.layers_{i}.blocks.0.attn.relative_position_bias_table"] for i in range(4)]
    return {
        "embed_dim": converted["backbone.body.patch_embed.proj.weight"].shape[0],
        "depths": depths,
        "num_heads": tuple(t.shape[1] for t in tables),
        "window_size": (round(tables[0].shape[0] ** 0.5) + 1) // 2,
    }


def infer_architecture(converted: Dict[str, torch.Tensor]) -> Tuple[Architecture, Dict[str, FeatureSpec]]:
    """Reads the architecture of a converted checkpoint from its parameters.

    Returns the `Architecture` and the shapes of the backbone maps it expects (as a
    backbone's `output_shape()`: res2 and the maps the encoder reads). Sizes that leave no
    trace in the weights (number of heads and points, selection sizes, guidance source) take
    the paper's values.

    NOTE: the encoder's finest input is res2 ("4 scales") when the first input projection
    reads as many channels as the FPN's lateral convolution (which always reads res2), else
    res3. A COCO panoptic checkpoint (133 classes) is MaskDINO's panoptic release, whose
    decoder boxes start from the selected tokens' predicted boxes (INITIALIZE_BOX_TYPE "no"),
    not from their masks; the others use mask-enhanced boxes, spanning pixel indices
    ("mask2box") on a ResNet and the pixels' edges ("bitmask") on MaskDINO's Swin-L.
    """
    names = list(converted)
    num_classes, hidden_dim = converted["head.heads.class_embed.weight"].shape
    projections = sorted(int(n.split(".")[2]) for n in names if re.match(r"encoder\.input_proj\.\d+\.0\.weight$", n))
    kernels = [converted[f"encoder.input_proj.{i}.0.weight"].shape[-1] for i in projections]
    num_inputs = kernels.count(1)
    res2_channels = converted["encoder.lateral_convs.0.conv.weight"].shape[1]
    finest = 2 if converted["encoder.input_proj.0.0.weight"].shape[1] == res2_channels else 3
    transformer_in = tuple(f"res{finest + i}" for i in range(num_inputs))
    channels = {f: converted[f"encoder.input_proj.{i}.0.weight"].shape[1] for i, f in enumerate(transformer_in)}
    channels["res2"] = res2_channels
    de_imbalance = None
    if any(n.startswith("head.de_imbalance.") for n in names):
        stages = _count(names, r"head\.de_imbalance\.stages\.(\d+)\.")
        sizes = tuple(300 * (stages + 1 - i) for i in range(stages + 1)) if stages > 1 else (600, 300)
        de_imbalance = DeImbalanceSpec(
            selection_sizes=sizes,
            token_interaction_layers=_count(names, r"head\.de_imbalance\.stages\.0\.layers\.(\d+)\."),
        )
    mask_enhanced = release_task(num_classes) != "coco_panoptic"
    arch = Architecture(
        num_classes=num_classes,
        mask_enhanced_boxes=mask_enhanced,
        mask_box_edges="pixels" if mask_enhanced and release_backbone(converted) == "swin" else "indices",
        hidden_dim=hidden_dim,
        mask_dim=converted["encoder.mask_features.weight"].shape[0],
        ffn_dim=converted["head.decoder.layers.0.ffn.linear1.weight"].shape[0],
        num_levels=converted["encoder.level_embed"].shape[0],
        num_decoder_layers=_count(names, r"head\.decoder\.layers\.(\d+)\."),
        encoder=EncoderSpec(
            in_features=transformer_in,
            num_layers=_count(names, r"encoder\.layers\.(\d+)\."),
            ffn_dim=converted["encoder.layers.0.ffn.linear1.weight"].shape[0],
        ),
        de_imbalance=de_imbalance,
        bato=BATOSpec() if any(n.startswith("head.bato.") for n in names) else None,
        denoising=DenoisingSpec() if "head.denoising.label_embed.weight" in converted else None,
    )
    backbone_shapes = {f: FeatureSpec(c, 2 ** int(f[3:])) for f, c in sorted(channels.items())}
    return arch, backbone_shapes


# The released networks this project has configs for: the configs that build each exactly.
RELEASED = [
    {
        "name": "DI-MaskDINO R50 (12, 24 or 50 epochs)",
        "de_imbalance": True,
        "num_levels": 4,
        "num_decoder_layers": 6,
        "encoder_ffn_dim": 2048,
        "configs": [
            "configs/coco/dimaskdino_r50_12ep.yaml",
            "configs/coco/dimaskdino_r50_24ep.yaml",
            "configs/coco/dimaskdino_r50_50ep.yaml",
        ],
    },
    {
        "name": "MaskDINO R50 instance, 50 epochs, 3 scales, hidden FFN 2048",
        "de_imbalance": False,
        "num_levels": 4,
        "num_decoder_layers": 9,
        "encoder_ffn_dim": 2048,
        "configs": ["configs/release/maskdino_r50_3s_hid2048_50ep.yaml"],
    },
    {
        "name": "MaskDINO R50 panoptic, 50 epochs",
        "num_classes": 133,
        "de_imbalance": False,
        "num_levels": 4,
        "num_decoder_layers": 9,
        "encoder_ffn_dim": 2048,
        "configs": ["configs/coco/panoptic/maskdino_r50_50ep.yaml"],
    },
    {
        "name": "MaskDINO Swin-L instance, 50 epochs, 4 scales",
        "backbone": "swin",
        "de_imbalance": False,
        "num_levels": 5,
        "num_decoder_layers": 9,
        "encoder_ffn_dim": 2048,
        "configs": [
            "configs/release/maskdino_swinl_4s_50ep.yaml",
            "configs/release/maskdino_swinl_4s_50ep_no_mask_enhance.yaml",
        ],
        # the two Swin-L instance releases have weights of the same shapes
        "choice": "the first config is for ..._maskenhanced_mask52.3ap_box59.0ap.pth, the second for "
        "..._instance_mask52.1ap_box58.3ap.pth (boxes not initialised from masks)",
    },
    {
        "name": "MaskDINO Swin-L panoptic, 50 epochs, 4 scales",
        "backbone": "swin",
        "num_classes": 133,
        "de_imbalance": False,
        "num_levels": 5,
        "num_decoder_layers": 9,
        "encoder_ffn_dim": 2048,
        "configs": ["configs/release/maskdino_swinl_4s_50ep_panoptic.yaml"],
    },
]


def matching_release(architecture, backbone: str = "resnet"):
    """The RELEASED entry whose network `architecture` is on `backbone` ("resnet" or "swin",
    see `release_backbone`; 80 COCO classes unless the entry says otherwise), or None."""
    for entry in RELEASED:
        if (
            entry.get("backbone", "resnet") == backbone
            and (architecture.de_imbalance is not None) == entry["de_imbalance"]
            and architecture.num_levels == entry["num_levels"]
            and architecture.num_decoder_layers == entry["num_decoder_layers"]
            and architecture.encoder.ffn_dim == entry["encoder_ffn_dim"]
            and architecture.num_classes == entry.get("num_classes", 80)
        ):
            return entry
    return None

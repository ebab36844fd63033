"""detectron2 configuration of DI-MaskDINO: `add_di_maskdino_config(cfg)` declares every key,
`architecture_from_config(cfg)` reads the model's keys into the core's `Architecture`.

All model keys live under MODEL.DI_MASKDINO; the paper's defaults are the values below.
Each key is read by exactly one `from_config` or builder (see tests/d2/test_config.py, which
fails on a key nobody reads).
"""

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..modeling.architecture import (
    ActivationCheckpointing,
    Architecture,
    BATOSpec,
    BoxMaskHeadSpec,
    DeImbalanceSpec,
    DenoisingSpec,
    EncoderSpec,
)
from .validation import validate_config

__all__ = [
    "add_di_maskdino_config",
    "load_config",
    "architecture_from_config",
    "use_available_device",
    "parse_command_line",
]


def architecture_from_config(cfg: CN) -> Architecture:
    """The network MODEL.DI_MASKDINO describes (its sizes, and which optional parts are on)."""
    m = cfg.MODEL.DI_MASKDINO
    return Architecture(
        num_classes=m.NUM_CLASSES,
        hidden_dim=m.HIDDEN_DIM,
        mask_dim=m.MASK_DIM,
        num_heads=m.NUM_HEADS,
        ffn_dim=m.DIM_FEEDFORWARD,
        dropout=m.DROPOUT,
        num_levels=m.NUM_FEATURE_LEVELS,
        num_points=m.DEC_N_POINTS,
        num_queries=m.NUM_OBJECT_QUERIES,
        num_decoder_layers=m.DEC_LAYERS,
        mask_enhanced_boxes=m.MASK_ENHANCED_BOXES,
        num_groups=m.ENCODER.NUM_GROUPS,
        encoder=EncoderSpec(
            in_features=tuple(m.ENCODER.IN_FEATURES),
            num_layers=m.ENCODER.NUM_LAYERS,
            ffn_dim=m.ENCODER.DIM_FEEDFORWARD,
            num_points=m.ENCODER.N_POINTS,
            common_stride=m.ENCODER.COMMON_STRIDE,
        ),
        de_imbalance=DeImbalanceSpec(
            selection_sizes=tuple(m.DE_IMBALANCE.SELECTION_SIZES), token_interaction_layers=m.DE_IMBALANCE.TI_LAYERS
        )
        if m.DE_IMBALANCE.ENABLED
        else None,
        bato=BATOSpec(
            guidance_source=m.BATO.GUIDANCE_SOURCE,
            generate_guiding_tokens=m.BATO.GENERATE_GUIDING_TOKENS,
            num_guiding_tokens=m.BATO.NUM_GUIDING_TOKENS,
        )
        if m.BATO.ENABLED
        else None,
        denoising=DenoisingSpec(num_queries=m.DN.NUM_QUERIES, noise_scale=m.DN.NOISE_SCALE) if m.DN.ENABLED else None,
        random_position_token=m.TOLERANCE.RANDOM_POSITION_TOKEN,
        checkpointing=ActivationCheckpointing(
            backbone=m.ACTIVATION_CHECKPOINTING.BACKBONE,
            encoder=m.ACTIVATION_CHECKPOINTING.ENCODER,
            token_interaction=m.ACTIVATION_CHECKPOINTING.TOKEN_INTERACTION,
            decoder=m.ACTIVATION_CHECKPOINTING.DECODER,
        ),
        mask_branch=cfg.MODEL.MASK_ON,
        box_mask_head=box_mask_head_spec(m.BOX_MASK_HEAD),
    )


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's defaults with DI-MaskDINO's keys, then `config_file`, then `opts`
    (KEY VALUE ... overrides), checked by `validate_config` (a value that cannot work raises
    ConfigError naming the key); not frozen, so that a tool can adjust it before freezing."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} does not exist (the shipped ones are under configs/)")
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    validate_config(cfg)
    _import_build_helper_quietly()
    return cfg


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`parser.parse_args`, with the config overrides (KEY VALUE ...) split off first and
    stored in `args.opts` (the parser must declare `opts`). An option taking several values
    (`--backend eager compile`, `--input a.jpg b.jpg`) would otherwise take the overrides
    that follow it as more of its values. Overrides start at the first word that is the full
    name of a config value (`MODEL.WEIGHTS`, `OUTPUT_DIR`) and is not the value of a
    one-value option (`--json TEST.JSON` stays a file name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    one_value = {name for action in parser._actions if action.nargs is None for name in action.option_strings}

    def names_a_value(word: str) -> bool:
        node = cfg
        for part in word.split("."):
            if not isinstance(node, CN) or part not in node:
                return False
            node = node[part]
        return not isinstance(node, CN)

    start = next(
        (i for i, word in enumerate(argv) if names_a_value(word) and (i == 0 or argv[i - 1] not in one_value)),
        len(argv),
    )
    args = parser.parse_args(argv[:start])
    args.opts = list(args.opts) + argv[start:]
    return args


def _import_build_helper_quietly() -> None:
    """On a machine without CUDA, imports torch's extension helper with its logger muted: its
    import-time "No CUDA runtime is found, using CUDA_HOME" warning (printed when detectron2
    collects the environment or Inductor compiles) concerns building CUDA code, not running
    a model; any later warning of the helper still prints."""
    if torch.cuda.is_available() or "torch.utils.cpp_extension" in sys.modules:
        return
    helper = logging.getLogger("torch.utils.cpp_extension")
    level = helper.level
    helper.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        helper.setLevel(level)


def use_available_device(cfg: CN) -> str:
    """Sets MODEL.DEVICE to "cpu" when it names CUDA and CUDA is not available; returns the
    one line that says so ("" when nothing changed)."""
    if torch.cuda.is_available():
        return ""
    _import_build_helper_quietly()
    if not str(cfg.MODEL.DEVICE).startswith("cuda"):
        return ""
    was = cfg.MODEL.DEVICE
    cfg.MODEL.DEVICE = "cpu"
    return f"CUDA is not available: running on the CPU (MODEL.DEVICE {was} -> cpu)"


def add_di_maskdino_config(cfg: CN) -> None:
    """Declares every DI-MaskDINO key (with the paper's values) on detectron2's defaults."""
    _add_model_keys(cfg)
    _add_part_keys(cfg.MODEL.DI_MASKDINO)
    _add_objective_keys(cfg.MODEL.DI_MASKDINO)
    _add_backbone_keys(cfg)
    _add_input_and_solver_keys(cfg)
    _add_memory_keys(cfg.MODEL.DI_MASKDINO)
    _add_box_mask_head_keys(cfg)
    _add_segmentation_keys(cfg)


def _add_model_keys(cfg: CN) -> None:
    cfg.MODEL.META_ARCHITECTURE = "DIMaskDINOArch"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    # False: detection only (no mask features, predictions, losses or annotations; boxes
    # initialised from the encoder's boxes, so MODEL.DI_MASKDINO.MASK_ENHANCED_BOXES False)
    cfg.MODEL.MASK_ON = True
    # the paper's backbone: detectron2's ResNet-50 with torchvision-style (RGB) weights
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    m = cfg.MODEL.DI_MASKDINO = CN()
    m.NUM_CLASSES = 80
    m.HIDDEN_DIM = 256
    m.MASK_DIM = 256
    m.NUM_HEADS = 8
    m.DIM_FEEDFORWARD = 2048
    m.DROPOUT = 0.0
    m.NUM_FEATURE_LEVELS = 4  # encoder levels, the extra stride-64 one included
    m.DEC_N_POINTS = 4
    m.NUM_OBJECT_QUERIES = 300
    m.DEC_LAYERS = 6
    m.MASK_ENHANCED_BOXES = True  # "mask2box" initial boxes
    m.SIZE_DIVISIBILITY = 32
    # training from MODEL.WEIGHTS: True loads what fits and lists the rest (fine-tuning, e.g.
    # with another class count); False requires the weights to fill the model or its backbone
    cfg.MODEL.LOAD_PARTIAL_WEIGHTS = False


def _add_part_keys(m: CN) -> None:
    m.ENCODER = CN()
    m.ENCODER.IN_FEATURES = ["res3", "res4", "res5"]  # maps entering the deformable encoder
    m.ENCODER.NUM_LAYERS = 6
    m.ENCODER.DIM_FEEDFORWARD = 2048
    m.ENCODER.N_POINTS = 4
    m.ENCODER.COMMON_STRIDE = 4  # stride of the mask features
    m.ENCODER.NUM_GROUPS = 32  # GroupNorm groups (encoder and BATO convolutions)

    m.DE_IMBALANCE = CN()
    m.DE_IMBALANCE.ENABLED = True
    m.DE_IMBALANCE.SELECTION_SIZES = [600, 300]  # k1, k2 (, k3); the last = NUM_OBJECT_QUERIES
    m.DE_IMBALANCE.TI_LAYERS = 2

    m.BATO = CN()
    m.BATO.ENABLED = True
    m.BATO.GUIDANCE_SOURCE = "Q_bal"  # T_i, T_s1, T_s2 or Q_bal (Tab. 5)
    m.BATO.GENERATE_GUIDING_TOKENS = True  # Tab. 6
    m.BATO.NUM_GUIDING_TOKENS = 50

    m.DN = CN()
    m.DN.ENABLED = True
    m.DN.NUM_QUERIES = 100
    m.DN.NOISE_SCALE = 0.4


def _add_objective_keys(m: CN) -> None:
    # imbalance tolerance tests (Tab. 3)
    m.TOLERANCE = CN()
    m.TOLERANCE.DETECTION_LOSS_FACTOR = 1.0  # 0.1: the loss-weight constraint
    m.TOLERANCE.RANDOM_POSITION_TOKEN = False  # the position-token constraint

    m.LOSS = CN()
    m.LOSS.CLASS_WEIGHT = 4.0
    m.LOSS.BOX_WEIGHT = 5.0
    m.LOSS.GIOU_WEIGHT = 2.0
    m.LOSS.MASK_WEIGHT = 5.0
    m.LOSS.DICE_WEIGHT = 5.0
    m.LOSS.FOCAL_ALPHA = 0.25
    m.LOSS.FOCAL_GAMMA = 2.0
    m.LOSS.TRAIN_NUM_POINTS = 12544
    m.LOSS.OVERSAMPLE_RATIO = 3.0
    m.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75

    m.MATCHER = CN()
    m.MATCHER.CLASS_WEIGHT = 4.0
    m.MATCHER.BOX_WEIGHT = 5.0
    m.MATCHER.GIOU_WEIGHT = 2.0
    m.MATCHER.MASK_WEIGHT = 5.0
    m.MATCHER.DICE_WEIGHT = 5.0


def _add_backbone_keys(cfg: CN) -> None:
    # timm backbones (MODEL.BACKBONE.NAME = "build_timm_backbone")
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "swin_large_patch4_window12_384"
    cfg.MODEL.TIMM.OUT_STRIDES = [4, 8, 16, 32]
    cfg.MODEL.TIMM.PRETRAINED = False  # timm's own weights (downloads); MODEL.WEIGHTS is the usual way
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.3
    cfg.MODEL.TIMM.IMG_SIZE = 0  # input size a model is built for (Swin, ViT); 0 = the model's default
    cfg.MODEL.TIMM.STRICT_IMG_SIZE = True  # False lets Swin/ViT take any input size (detection)


def _add_input_and_solver_keys(cfg: CN) -> None:
    # data: "lsj" (large-scale jitter, the paper's COCO setting) or "resize" (shortest edge)
    cfg.INPUT.DATASET_MAPPER_NAME = "lsj"
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # nn.Embedding (the denoising label embedding), as the release
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.CHECKPOINTS_TO_KEEP = 0  # newest periodic checkpoints kept (0: all); model_final.pth always

    # evaluation under autocast: "" (float32), "bfloat16" or "float16" (as training's AMP: the
    # deformable attention, encoder and decoder arithmetic stay in float32 where they ask for it)
    cfg.TEST.AUTOCAST_DTYPE = ""
    # CPU inference: 3x3 stride-1 convolutions by NNPACK's Winograd transform (di_maskdino.ops.winograd;
    # float32, differing from the direct convolution by rounding only); False: oneDNN's direct ones
    cfg.TEST.WINOGRAD_CONVOLUTIONS = True


def _add_memory_keys(m: CN) -> None:
    # activation checkpointing in training: memory for time, the same losses and gradients
    # (README "Memory"; tools/benchmark_memory.py measures each switch)
    m.ACTIVATION_CHECKPOINTING = CN()
    m.ACTIVATION_CHECKPOINTING.BACKBONE = False  # the ResNet stages / timm's checkpointing
    m.ACTIVATION_CHECKPOINTING.ENCODER = False  # deformable encoder layers and the mask-feature FPN
    m.ACTIVATION_CHECKPOINTING.TOKEN_INTERACTION = False  # token-interaction layers of the DI module
    m.ACTIVATION_CHECKPOINTING.DECODER = False  # decoder layers and BATO


# --- The box-conditioned mask head (modeling/box_mask_head.py) and MODEL.FREEZE ---

TEST_MASKS = ("refined", "detector", "both")


def box_mask_head_spec(node: CN):
    """MODEL.DI_MASKDINO.BOX_MASK_HEAD as a `BoxMaskHeadSpec`, or None when not ENABLED."""
    spec = BoxMaskHeadSpec(
        hidden_dim=node.HIDDEN_DIM,
        roi_size=node.ROI_SIZE,
        mask_size=node.MASK_SIZE,
        image_encoder_layers=node.IMAGE_ENCODER_LAYERS,
        box_encoder_layers=node.BOX_ENCODER_LAYERS,
        fine_feature=node.FINE_FEATURE or None,
        mask_prior=node.MASK_PRIOR,
        box_expansion=node.BOX_EXPANSION,
        mask_quality=node.MASK_QUALITY,
    )
    return spec if node.ENABLED else None


def _add_box_mask_head_keys(cfg: CN) -> None:
    # parameter-name prefixes whose parameters do not train (e.g. ["backbone."]); a prefix
    # that matches no parameter is an error
    cfg.MODEL.FREEZE = []

    b = cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD = CN()
    b.ENABLED = False
    b.HIDDEN_DIM = 128
    b.ROI_SIZE = 28  # RoIAlign resolution inside each box
    b.MASK_SIZE = 56  # mask logits per box: ROI_SIZE times a power of 2
    b.IMAGE_ENCODER_LAYERS = 1
    b.BOX_ENCODER_LAYERS = 4
    b.FINE_FEATURE = ""  # fused into the box features: a backbone map ("res2"), "image", or "" (none)
    b.MASK_PRIOR = True  # start from the detector's own mask inside the box
    b.BOX_EXPANSION = 1.0  # the RoI is the predicted box with width and height times this
    b.MASK_QUALITY = True  # predicted mask IoU rescales the instance score
    b.TEST_MASKS = "refined"  # "refined", "detector" or "both" (both evaluated, see README)
    b.MASK_WEIGHT = 5.0
    b.DICE_WEIGHT = 5.0
    b.QUALITY_WEIGHT = 1.0
    b.NUM_POINTS = 3136  # points per box for the mask losses


def _add_segmentation_keys(cfg: CN) -> None:
    """Panoptic and semantic segmentation (di_maskdino/modeling/panoptic.py,
    di_maskdino/d2/panoptic.py, di_maskdino/d2/panoptic_data.py)."""
    m = cfg.MODEL.DI_MASKDINO
    # which outputs inference makes, in any combination, evaluated together
    m.TEST = CN()
    m.TEST.INSTANCE_ON = True
    m.TEST.PANOPTIC_ON = False
    m.TEST.SEMANTIC_ON = False
    m.TEST.OBJECT_MASK_THRESHOLD = 0.25  # panoptic: queries whose best class score is not above it are dropped
    m.TEST.OVERLAP_THRESHOLD = 0.8  # panoptic: a query must win this fraction of its own mask
    # NOTE: MaskDINO sharpens the sigmoid class scores with softmax(sigmoid / T) for panoptic
    # and semantic inference; 0 turns the sharpening off.
    m.TEST.TEMPERATURE = 0.06
    # NOTE: False (MaskDINO's paper): box losses and box matching costs for thing targets only,
    # a stuff region's box means little; True also supervises the boxes of stuff (and of
    # semantic-segmentation class regions), as the release's configs train (PANO_BOX_LOSS False).
    m.LOSS.STUFF_BOX_LOSS = False

    # the semantic-segmentation recipe (INPUT.DATASET_MAPPER_NAME "semantic"): shortest-edge
    # resize, then INPUT.CROP (detectron2's keys), retried until no class covers more than this
    # fraction of the crop
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.COLOR_AUG_SSD = False  # SSD's colour jitter

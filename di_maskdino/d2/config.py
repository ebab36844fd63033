"""detectron2 configuration of DI-MaskDINO: `add_di_maskdino_config(cfg)` declares every key,
`architecture_from_config(cfg)` reads the model's keys into the core's `Architecture`.

All model keys live under MODEL.DI_MASKDINO; the paper's defaults are the values below.
Each key is read by exactly one `from_config` or builder (see tests/d2/test_config.py, which
fails on a key nobody reads).
"""

from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..modeling.architecture import Architecture, BATOSpec, DeImbalanceSpec, DenoisingSpec, EncoderSpec

__all__ = ["add_di_maskdino_config", "load_config", "architecture_from_config"]


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
    )


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's defaults with DI-MaskDINO's keys, then `config_file`, then `opts`
    (KEY VALUE ... overrides); not frozen, so that a tool can adjust it before freezing."""
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def add_di_maskdino_config(cfg: CN) -> None:
    """Declares every DI-MaskDINO key (with the paper's values) on detectron2's defaults."""
    _add_model_keys(cfg)
    _add_part_keys(cfg.MODEL.DI_MASKDINO)
    _add_objective_keys(cfg.MODEL.DI_MASKDINO)
    _add_backbone_keys(cfg)
    _add_input_and_solver_keys(cfg)
    _add_segmentation_keys(cfg)


def _add_model_keys(cfg: CN) -> None:
    cfg.MODEL.META_ARCHITECTURE = "DIMaskDINOArch"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"
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
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP.ENABLED = True


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

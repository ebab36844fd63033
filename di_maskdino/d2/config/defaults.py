"""detectron2 configuration of DI-MaskDINO: `add_di_maskdino_config(cfg)` declares every key
on detectron2's defaults, with the paper's values.

All model keys live under MODEL.DI_MASKDINO. Each key is read by exactly one reader
(`specs.py` for the model and its objective, a `from_config` or builder for the rest; see
tests/d2/config/test_config.py, which fails on a key nobody reads).
"""

from detectron2.config import CfgNode as CN

from ...modeling import PIXEL_MEAN, PIXEL_STD

__all__ = ["add_di_maskdino_config"]


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
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(PIXEL_STD)
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
    m.MASK_ENHANCED_BOXES = True  # initial boxes from the selected tokens' masks
    m.MASK_BOX_EDGES = "indices"  # their extent: "indices" (release's "mask2box") or "pixels" ("bitmask")
    m.SIZE_DIVISIBILITY = 32
    # make the padded region of a batch invisible to its images (predictions independent of the
    # batch; boxes normalised by each image); off in the release's configurations
    m.PADDING_MASK = False
    # COCO-format instance datasets registered by name for this run, each [NAME, ANNOTATION_JSON,
    # IMAGE_FOLDER] (tools/train_net.py --coco-dataset adds one); use NAME in DATASETS.TRAIN / TEST
    cfg.DATASETS.COCO_FORMAT = []
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
    # timm backbones (MODEL.BACKBONE.NAME = "build_timm_backbone", or "build_swin_backbone" for a
    # swin_* model computing as MaskDINO's released Swin: IMG_SIZE and STRICT_IMG_SIZE do not apply)
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "swin_large_patch4_window12_384"
    cfg.MODEL.TIMM.OUT_STRIDES = [4, 8, 16, 32]
    cfg.MODEL.TIMM.PRETRAINED = False  # timm's own weights (downloads); MODEL.WEIGHTS is the usual way
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.3
    cfg.MODEL.TIMM.IMG_SIZE = 0  # input size a model is built for (Swin, ViT); 0 = the model's default
    cfg.MODEL.TIMM.STRICT_IMG_SIZE = True  # False lets Swin/ViT take any input size (detection)

    # vision transformers (MODEL.BACKBONE.NAME = "build_vit_backbone"): a plain timm ViT whose
    # last map detectron2's SimpleFeaturePyramid (ViTDet) turns into p2..p5 (strides 4..32)
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.NAME = "vit_base_patch14_dinov2"  # any plain timm ViT (DINOv2, DINOv3, DeiT, ...)
    # NOTE: the pyramid's strides 4..32 need 16-pixel patches. 0 keeps the model's own; DINOv2's
    # 14 is changed to 16 (timm resamples the pretrained patch embedding when loading it).
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.PRETRAINED = False  # timm's pretrained weights of NAME (its cache; downloads when missing)
    cfg.MODEL.VIT.PRETRAINED_FILE = ""  # a local timm checkpoint of NAME (loaded by timm; implies PRETRAINED)
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1  # stochastic depth of the blocks
    cfg.MODEL.VIT.OUT_CHANNELS = 256  # channels of every pyramid map


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
    # layer-wise learning-rate decay of a ViT backbone (build_vit_backbone; ViTDet's rule): of L
    # blocks, block i (1..L) trains at LAYER_DECAY ** (L + 1 - i) x its rate, the patch and
    # position embeddings and the class / register tokens at LAYER_DECAY ** (L + 1); the final
    # norm, the pyramid and the rest of the model are not decayed. The factor multiplies
    # BACKBONE_MULTIPLIER's. 1.0: off
    cfg.SOLVER.LAYER_DECAY = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.CHECKPOINTS_TO_KEEP = 0  # newest periodic checkpoints kept (0: all); model_final.pth always
    # micro-batches per optimizer step: SOLVER.IMS_PER_BATCH images per step in all, in
    # ACCUMULATION_STEPS micro-batches of IMS_PER_BATCH / (ACCUMULATION_STEPS x processes) per
    # process; the losses are those of the whole batch (engine/train_step.py). MAX_ITER, STEPS,
    # CHECKPOINT_PERIOD and EVAL_PERIOD count optimizer steps.
    cfg.SOLVER.ACCUMULATION_STEPS = 1

    # exponential moving average of the weights (engine/ema.py, timm's ModelEmaV3): off in the
    # configs that reproduce the paper; *_ema.yaml configs turn it on
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.9998
    cfg.MODEL_EMA.WARMUP = True  # decay 1 - (1 + step) ** -WARMUP_POWER until it reaches DECAY
    cfg.MODEL_EMA.WARMUP_POWER = 0.75
    # evaluation (during training, --eval-only, demo, Predictor, export) uses the EMA weights of
    # a checkpoint that has them
    cfg.MODEL_EMA.USE_FOR_EVALUATION = True

    # evaluation under autocast: "" (float32), "bfloat16" or "float16" (as training's AMP: the
    # deformable attention, encoder and decoder arithmetic stay in float32 where they ask for it)
    cfg.TEST.AUTOCAST_DTYPE = ""
    # CPU inference speed-ups (di_maskdino.cpu_inference): evaluation's 3x3 convolutions by
    # NNPACK's Winograd transform (float32, differing from the direct ones by rounding only), and
    # the tools keep freed memory in the process. Off in the library; the tools that profit
    # (train_net, demo, analyze_imbalance) turn it on; give TEST.CPU_SPEEDUPS False to turn it off.
    cfg.TEST.CPU_SPEEDUPS = False


def _add_memory_keys(m: CN) -> None:
    # activation checkpointing in training: memory for time, the same losses and gradients
    # (docs/memory.md; dev/benchmark_memory.py measures each switch)
    m.ACTIVATION_CHECKPOINTING = CN()
    m.ACTIVATION_CHECKPOINTING.BACKBONE = False  # the ResNet stages / timm's checkpointing
    m.ACTIVATION_CHECKPOINTING.ENCODER = False  # deformable encoder layers and the mask-feature FPN
    m.ACTIVATION_CHECKPOINTING.TOKEN_INTERACTION = False  # token-interaction layers of the DI module
    m.ACTIVATION_CHECKPOINTING.DECODER = False  # decoder layers and BATO


# --- The box-conditioned mask head (modeling/box_mask_head.py) and MODEL.FREEZE ---


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
    b.TEST_MASKS = "refined"  # "refined", "detector" or "both" (both evaluated, docs/mask_refinement.md)
    b.MASK_WEIGHT = 5.0
    b.DICE_WEIGHT = 5.0
    b.QUALITY_WEIGHT = 1.0
    b.NUM_POINTS = 3136  # points per box for the mask losses


def _add_segmentation_keys(cfg: CN) -> None:
    """Panoptic and semantic segmentation (di_maskdino/modeling/segmentation_inference.py,
    di_maskdino/d2/modeling/inference_settings.py, di_maskdino/d2/data/segmentation_mappers.py)."""
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

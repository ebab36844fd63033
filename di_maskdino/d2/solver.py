"""The optimizer of the paper's recipe: AdamW with a backbone learning-rate multiplier,
per-kind weight decay and gradient clipping of the whole model's norm; parameters frozen by
MODEL.FREEZE are left out. With a ViT backbone, layer-wise learning-rate decay
(SOLVER.LAYER_DECAY, ViTDet's rule)."""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers.batch_norm import LayerNorm as ChannelLayerNorm
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = [
    "build_optimizer",
    "full_model_gradient_clipping",
    "optimizer_param_groups",
    "freeze_parameters",
    "layer_decay_factor",
    "lr_factors",
]

# The norm layers whose weights take SOLVER.WEIGHT_DECAY_NORM: every batch and instance norm
# (detectron2's NaiveSyncBatchNorm too), group, layer and local-response norm.
# NOTE: `_NormBase` is torch's private common base of the batch and instance norms;
# tests/d2/test_solver.py checks that it still covers them.
NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    ChannelLayerNorm,  # detectron2's LayerNorm over the channels of (B, C, H, W) maps ("LN")
    torch.nn.LocalResponseNorm,
)
# timm's names of the tokens a ViT prepends to the patch tokens (class, register, DeiT's
# distillation token)
PREFIX_TOKENS = ("cls_token", "reg_token", "dist_token")
# Swin's position tables and ViTs' position embeddings and prefix tokens are not decayed
# (timm's `no_weight_decay()` of those models; the release's convention for Swin)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed") + PREFIX_TOKENS

logger = logging.getLogger("di_maskdino")


def freeze_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> Tuple[int, int]:
    """Sets requires_grad False on every parameter whose name starts with one of `prefixes`
    (MODEL.FREEZE, e.g. "backbone."); returns (trainable, total) parameter counts. A prefix
    that matches no parameter is an error naming it."""
    prefixes = tuple(prefixes)
    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
    if unknown:
        tops = sorted({name.split(".")[0] + "." for name in names})
        raise ValueError(
            f"MODEL.FREEZE: {unknown} match no parameter name; names start with {tops} "
            "(a prefix is matched against full names such as 'head.decoder.layers.0.')"
        )
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


OPTIMIZERS = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def full_model_gradient_clipping(optimizer_class, max_norm: float, norm_type: float):
    """An optimizer class whose step first clips the gradient norm of all parameters
    together (SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"; detectron2 clips per parameter)."""

    class FullModelClipping(optimizer_class):
        def step(self, closure=None):
            parameters = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelClipping.__name__ = f"{optimizer_class.__name__}FullModelClipping"
    return FullModelClipping


def layer_decay_factor(name: str, layer_decay: float, num_blocks: int) -> float:
    """The learning-rate factor of parameter `name` (a full name, "backbone.net.body.blocks.3.
    attn.qkv.weight") under layer-wise decay of a ViT backbone with `num_blocks` blocks:
    detectron2's ViTDet rule (`get_vit_lr_decay_rate`): block i (1..L) layer_decay ** (L + 1 -
    i), the patch and position embeddings layer_decay ** (L + 1), everything else 1.

    NOTE: detectron2's rule leaves the class and register tokens (PREFIX_TOKENS, which
    ViTDet's ViT does not have) at 1; they enter the first block with the position
    embeddings, so they take the embeddings' factor here, as BEiT's and MAE's fine-tuning
    recipes do."""
    if num_blocks < 1:  # detectron2's rule would then raise block i's rate by decay ** -i
        raise ValueError(f"layer_decay_factor: the backbone's number of blocks must be at least 1, got {num_blocks}")
    if name.startswith("backbone.") and name.rsplit(".", 1)[-1] in PREFIX_TOKENS:
        return layer_decay ** (num_blocks + 1)
    return get_vit_lr_decay_rate(name, layer_decay, num_blocks)


def optimizer_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    lr_factor: Optional[Callable[[str], float]] = None,
) -> List[Dict[str, Any]]:
    """detectron2's per-parameter groups (merged by `reduce_param_groups`): lr x
    `lr_factor(full parameter name)` (as detectron2's `lr_factor_func`; see `lr_factors`); weight decay
    `weight_decay_norm` for normalisation layers, `weight_decay_embed` for every nn.Embedding
    (the denoising label embedding), 0 for Swin's position tables and ViTs' position
    embeddings and tokens, `weight_decay` for everything else."""
    params, seen = [], set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif isinstance(module, torch.nn.Embedding):
                # NOTE: the release (SOLVER.WEIGHT_DECAY_EMBED, 0.0 in its configs) does not decay
                # embeddings; detectron2's default parameter groups would decay them by WEIGHT_DECAY.
                decay = weight_decay_embed
            elif name in NO_DECAY_NAMES:
                decay = 0.0
            lr = base_lr * (lr_factor(f"{module_name}.{name}") if lr_factor is not None else 1.0)
            params.append({"params": [value], "lr": lr, "weight_decay": decay})
    return reduce_param_groups(params)


def lr_factors(model: torch.nn.Module, backbone_multiplier: float, layer_decay: float) -> Callable[[str], float]:
    """The learning-rate factor of each full parameter name: `backbone_multiplier` for the
    backbone's, times `layer_decay_factor` when `layer_decay` is not 1.0 (a ViT backbone's
    blocks; another backbone is an error naming SOLVER.LAYER_DECAY)."""
    blocks = backbone_blocks(model, layer_decay) if layer_decay != 1.0 else 0

    def factor(name: str) -> float:
        if not name.startswith("backbone."):
            return 1.0
        return backbone_multiplier * (layer_decay_factor(name, layer_decay, blocks) if blocks else 1.0)

    return factor


def backbone_blocks(model: torch.nn.Module, layer_decay: float) -> int:
    """The number of blocks of the model's ViT backbone that SOLVER.LAYER_DECAY (`layer_decay`,
    named in the error) decays; a backbone without numbered blocks is an error naming the key."""
    backbone = getattr(model, "backbone", None)
    blocks = getattr(backbone, "num_blocks", 0)
    if not blocks:
        raise ValueError(
            f"SOLVER.LAYER_DECAY {layer_decay} decays the learning rate block by block of a vision transformer "
            f"backbone, but this backbone ({type(backbone).__name__}) has no numbered blocks: use a ViT backbone "
            "(MODEL.BACKBONE.NAME build_vit_backbone) or set SOLVER.LAYER_DECAY 1.0 (off)"
        )
    return blocks


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER (ADAMW or SGD) over `optimizer_param_groups` (SOLVER.BASE_LR,
    BACKBONE_MULTIPLIER, LAYER_DECAY, WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_EMBED),
    with SOLVER.CLIP_GRADIENTS.

    First freezes MODEL.FREEZE's parameters (`freeze_parameters`): they are in no group, so
    they get no optimizer state; the log says how many parameters train."""
    trainable, total = freeze_parameters(model, cfg.MODEL.FREEZE)
    if trainable == 0:
        raise ValueError(f"MODEL.FREEZE {list(cfg.MODEL.FREEZE)} freezes every parameter: nothing would train")
    if cfg.MODEL.FREEZE and not cfg.MODEL.WEIGHTS:
        raise ValueError(
            f"MODEL.FREEZE {list(cfg.MODEL.FREEZE)} freezes parameters but MODEL.WEIGHTS is empty: they would keep "
            "their random initialisation; set MODEL.WEIGHTS to a trained checkpoint"
        )
    logger.info(
        f"training {trainable:,} of {total:,} parameters ({total - trainable:,} frozen by MODEL.FREEZE "
        f"{list(cfg.MODEL.FREEZE)})"
    )
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {solver.OPTIMIZER!r}")
    params = optimizer_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        lr_factor=lr_factors(model, solver.BACKBONE_MULTIPLIER, solver.LAYER_DECAY),
    )
    optimizer_class = OPTIMIZERS[solver.OPTIMIZER]
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_class = full_model_gradient_clipping(optimizer_class, clip.CLIP_VALUE, clip.NORM_TYPE)
    kwargs = {"lr": solver.BASE_LR}
    if solver.OPTIMIZER == "SGD":
        kwargs["momentum"] = solver.MOMENTUM
    optimizer = optimizer_class(params, **kwargs)
    if clip.ENABLED and clip.CLIP_TYPE != "full_model":
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer

"""A plain timm vision transformer (ViT, DeiT, EVA, DINOv2, DINOv3, ...: one resolution
throughout) as a single-map backbone, for a simple feature pyramid to turn into several
(detectron2's `SimpleFeaturePyramid`, ViTDet; see `di_maskdino.d2.modeling.vit`).

Shapes: B images of H x W pixels, patch size P, width C (the model's embed_dim); the map is
(B, C, ceil(H / P), ceil(W / P)) at stride P.
"""

import os
from typing import Dict, Optional

import torch
from torch import nn

from .architecture import SpecError
from .backbone import FeatureSpec

__all__ = ["TimmViT", "probe_vit"]

FEATURE = "vit"  # the name of the one map


def _timm_kwargs(patch_size: int, **kwargs) -> Dict:
    """timm.create_model's arguments of a ViT that takes any input size: position embeddings
    interpolated to the input's patch grid (dynamic_img_size), the image padded on the right
    and bottom to a multiple of P (dynamic_img_pad)."""
    kwargs = dict(kwargs, dynamic_img_size=True, dynamic_img_pad=True)
    if patch_size:
        kwargs["patch_size"] = patch_size
    return kwargs


def probe_vit(model_name: str, patch_size: int = 0, **kwargs) -> nn.Module:
    """The timm model `model_name` built on the meta device (no memory, no weights), after
    checking that it is a plain vision transformer; raises SpecError naming the argument
    (model_name, patch_size) that cannot work."""
    import timm

    if not timm.is_model(model_name):
        raise SpecError(
            "TimmViT",
            [
                (
                    "model_name",
                    f"a timm model name; {model_name!r} is not one (timm.list_models('vit_*dinov2*') and "
                    "timm.list_models('vit_*dinov3*') list DINOv2 and DINOv3)",
                )
            ],
        )
    if patch_size < 0:
        raise SpecError("TimmViT", [("patch_size", f"at least 0 (0: the model's own), got {patch_size}")])
    not_a_vit = (
        "model_name",
        f"a plain vision transformer (patch embedding, then blocks at one resolution, e.g. vit_base_patch14_dinov2, "
        f"vit_base_patch16_dinov3); timm's {model_name}",
    )
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, **_timm_kwargs(patch_size, **kwargs))
    except TypeError as error:  # a model without dynamic_img_size / dynamic_img_pad
        raise SpecError("TimmViT", [(not_a_vit[0], f"{not_a_vit[1]} is not one ({error})")]) from error
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if not (
        isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))
        and patch is not None
        and hasattr(model, "forward_intermediates")
    ):
        raise SpecError("TimmViT", [(not_a_vit[0], f"{not_a_vit[1]} ({type(model).__name__}) is not one")])
    if patch[0] != patch[1]:
        raise SpecError("TimmViT", [("patch_size", f"square; {model_name} has {tuple(patch)} patches")])
    return model


def _short(error: Exception, width: int = 200) -> str:
    """The error's message on one line, each of its lines cut to `width` characters (torch
    lists every missing and every unexpected key on one line each; the count is kept)."""
    lines = []
    for line in str(error).splitlines():
        line = " ".join(line.split())
        if len(line) > width:
            names = line.count('", "') + 1 if '", "' in line else 0  # a list of quoted names
            line = f"{line[:width]} ... ({names} in all)" if names else f"{line[:width]} ..."
        lines.append(line)
    return " ".join(line for line in lines if line)


class TimmViT(nn.Module):
    """The last block's patch tokens of a timm vision transformer, after the model's final
    norm, as the map "vit" (B, C, ceil(H / P), ceil(W / P)) at stride P. The class and
    register tokens take part in attention and are dropped from the map (timm's
    `forward_intermediates`). Any input size: see `_timm_kwargs`.

    The timm model is `self.body` (parameter names body.cls_token, body.pos_embed,
    body.patch_embed.*, body.blocks.N.*, body.norm.*); its classifier is removed.

    NOTE: the map is the final norm's output (the tokens that DINOv2's and DINOv3's training
    objectives saw, and what their dense evaluations read), not the raw output of the last
    block; a model without a final norm (timm's nn.Identity) gives the block's output.

    Args:
        model_name: a timm ViT (e.g. vit_base_patch14_dinov2, vit_base_patch16_dinov3).
        patch_size: P; 0 keeps the model's. Another value builds the patch embedding for P
            (and position embeddings for the new grid); timm resamples pretrained ones to it
            when loading them.
        pretrained: load timm's pretrained weights of model_name (from its cache; downloads
            when they are not there).
        pretrained_file: a local timm checkpoint of model_name (the state dict of
            `timm.create_model(model_name)`, as timm publishes it), loaded through timm's own
            loading (which resamples position and patch embeddings); implies pretrained.
        drop_path_rate: stochastic depth of the blocks (timm's linear rule up to this rate).
        **kwargs: more arguments of timm.create_model (e.g. depth, embed_dim, num_heads).

    Raises SpecError naming the argument that cannot work (a name that is no timm ViT, a
    missing file or one that does not fit the model, weights timm cannot fetch).
    """

    def __init__(
        self,
        model_name: str,
        *,
        patch_size: int = 0,
        pretrained: bool = False,
        pretrained_file: str = "",
        drop_path_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        import timm

        probe_vit(model_name, patch_size, **kwargs)
        self.model_name = model_name
        kwargs = _timm_kwargs(patch_size, drop_path_rate=drop_path_rate, **kwargs)
        if pretrained_file:
            if not os.path.isfile(pretrained_file):
                raise SpecError("TimmViT", [("pretrained_file", f"an existing file; {pretrained_file!r} is not one")])
            kwargs["pretrained_cfg_overlay"] = dict(file=pretrained_file)
        try:
            self.body = timm.create_model(model_name, pretrained=pretrained or bool(pretrained_file), **kwargs)
        except Exception as error:  # any loading failure, reported with the argument that caused it
            if not (pretrained or pretrained_file):
                raise
            if pretrained_file:
                problem = (
                    "pretrained_file",
                    f"a timm checkpoint of {model_name} (the state dict of timm.create_model({model_name!r}), as timm "
                    f"publishes it); loading {pretrained_file} failed: {_short(error)}",
                )
            else:
                problem = (
                    "pretrained",
                    f"False, or timm must find {model_name}'s weights in its cache or download them; it could not "
                    f"({_short(error)}): give a local copy with `pretrained_file`",
                )
            raise SpecError("TimmViT", [problem]) from error
        # only the last block's map is used: the classifier (and pooling) go, the final norm stays
        self.body.prune_intermediate_layers(len(self.body.blocks), prune_norm=False, prune_head=True)
        self.patch_size = int(self.body.patch_embed.patch_size[0])

    @property
    def num_blocks(self) -> int:
        return len(self.body.blocks)

    def output_shape(self) -> Dict[str, FeatureSpec]:
        return {FEATURE: FeatureSpec(self.body.embed_dim, self.patch_size)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing: each block one region (non-reentrant)."""
        self.body.set_grad_checkpointing(enable)

    @property
    def export_size_problem(self) -> Optional[str]:
        """Why `torch.export` cannot keep the input size of this model dynamic, or None
        (`di_maskdino.export.export_program` refuses a model with such a part)."""
        if getattr(self.body, "rope", None) is None:
            return None
        return (
            f"timm's rotary position embedding of {self.model_name} (DINOv3, EVA) builds its coordinate grid from "
            "concrete sizes, so torch.export fixes the input size of the program (which then fails on any other); "
            "export a ViT with learned position embeddings (e.g. DINOv2) or run this one in PyTorch (Predictor)"
        )

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        # NOTE: timm's output_fmt="NCHW" reshapes the tokens left after the prefix tokens are
        # sliced off, which makes torch.export guard the program to batches other than 1;
        # splitting the token axis into the grid (unflatten) is a view for every batch size,
        # and the copy to a contiguous map spares the convolutions behind a guard on it too.
        (tokens,) = self.body.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NLC", intermediates_only=True
        )
        grid = self.body.patch_embed.dynamic_feat_size(images.shape[-2:])
        return {FEATURE: tokens.unflatten(1, grid).permute(0, 3, 1, 2).contiguous()}

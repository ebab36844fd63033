"""A tiny DI-MaskDINO for fast CPU tests: a four-stage strided-conv backbone, width 32."""

from dataclasses import replace

import torch
from torch import nn

from di_maskdino.layers import checkpointed
from di_maskdino.modeling import (
    Architecture,
    BATOSpec,
    DeImbalanceSpec,
    DenoisingSpec,
    DIMaskDINO,
    EncoderSpec,
    FeatureSpec,
    build_model,
)

NUM_CLASSES = 3
TINY = Architecture(
    num_classes=NUM_CLASSES,
    hidden_dim=32,
    mask_dim=32,
    num_heads=4,
    ffn_dim=64,
    num_queries=12,
    num_decoder_layers=3,
    num_groups=8,
    encoder=EncoderSpec(num_layers=1, ffn_dim=64),
    de_imbalance=DeImbalanceSpec(selection_sizes=(24, 12), token_interaction_layers=2),
    bato=BATOSpec(num_guiding_tokens=4),
    denoising=DenoisingSpec(num_queries=8),
)


class TinyBackbone(nn.Module):
    """res2..res5 at strides 4..32: one strided conv + ReLU per stage, or with `deep`, two
    3x3 convs with GroupNorm per stage (enough to learn from scratch)."""

    def __init__(self, channels=(8, 16, 24, 32), deep: bool = False):
        super().__init__()
        self.channels = channels
        self.grad_checkpointing = False
        self.stages = nn.ModuleList()
        previous = 3
        for index, c in enumerate(channels):
            if deep:
                blocks = [nn.Conv2d(previous, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.ReLU()]
                if index == 0:  # stride 4 for res2
                    blocks += [nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.ReLU()]
                blocks += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU()]
            else:
                stride = 4 if index == 0 else 2
                blocks = [nn.Conv2d(previous, c, stride, stride=stride), nn.ReLU()]
            self.stages.append(nn.Sequential(*blocks))
            previous = c

    def output_shape(self):
        return {f"res{i + 2}": FeatureSpec(c, 4 * 2**i) for i, c in enumerate(self.channels)}

    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing of every stage (the backbone switch of the model core)."""
        self.grad_checkpointing = enable

    def forward(self, x):
        features = {}
        for index, stage in enumerate(self.stages):
            x = checkpointed(self.grad_checkpointing, stage, x)
            features[f"res{index + 2}"] = x
        return features


def tiny_architecture(**overrides) -> Architecture:
    """TINY with some fields replaced; `bato=dict(...)` / `de_imbalance=dict(...)` /
    `denoising=dict(...)` / `encoder=dict(...)` replace fields of those parts."""
    for part in ("bato", "de_imbalance", "denoising", "encoder"):
        if isinstance(overrides.get(part), dict):
            overrides[part] = replace(getattr(TINY, part), **overrides[part])
    return replace(TINY, **overrides)


def tiny_model(seed: int = 0, **overrides) -> DIMaskDINO:
    torch.manual_seed(seed)
    return build_model(tiny_architecture(**overrides), TinyBackbone())


def tiny_images(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=generator) * 255, torch.rand(3, 56, 80, generator=generator) * 255]


def tiny_targets():
    return [
        dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
        dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.3]])),
    ]


def tiny_mask_targets(dtype=torch.float32):
    """tiny_targets' layout with masks at the padded input size (64 x 96) of tiny_images."""
    masks = torch.zeros(2, 64, 96)
    masks[0, 10:30, 20:50] = 1
    masks[1, 30:50, 10:30] = 1
    targets = [
        dict(
            labels=torch.tensor([0, 2]),
            boxes=torch.tensor([[35 / 96, 20 / 64, 30 / 96, 20 / 64], [20 / 96, 40 / 64, 20 / 96, 20 / 64]]),
            masks=masks,
        ),
        dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.3, 0.3]]), masks=torch.ones(1, 64, 96)),
    ]
    return [dict(t, boxes=t["boxes"].to(dtype), masks=t["masks"].to(dtype)) for t in targets]


def all_predictions(output):
    """Every Predictions of a DIMaskDINOOutput, with a name."""
    named = [(f"layer{i}", p) for i, p in enumerate(output.layers)]
    if output.encoder is not None:
        named.append(("encoder", output.encoder))
    for s, stage in enumerate(output.token_interaction):
        named += [(f"ti{s}.{i}", p) for i, p in enumerate(stage)]
    if output.denoising is not None:
        named += [(f"dn{i}", p) for i, p in enumerate(output.denoising.layers)]
    return named


def encoded(model, images=None):
    """(preprocessed batch, encoder output, T_i as the head reads it) of `images`."""
    batch, _ = model.preprocess(images or tiny_images())
    encoder_output = model.encoder(model.backbone(batch))
    return batch, encoder_output, model.head.feature_tokens(encoder_output)


def perturb(model, seed: int = 1, scale: float = 0.05):
    """Adds noise to every parameter, so that zero-initialised heads (box deltas, attention
    weights) take part in the computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model

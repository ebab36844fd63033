"""A tiny DI-MaskDINO for fast CPU tests: a four-stage strided-conv backbone, width 32."""
import torch
from torch import nn

from di_maskdino.modeling import DIMaskDINO, DIMaskDINOHead, FeatureSpec, MaskDINOEncoder

NUM_CLASSES = 3
HEAD_DEFAULTS = dict(
    num_classes=NUM_CLASSES,
    hidden_dim=32,
    mask_dim=32,
    num_heads=4,
    ffn_dim=64,
    num_queries=12,
    selection_sizes=(24, 12),
    token_interaction_layers=2,
    num_decoder_layers=3,
    num_guiding_tokens=4,
    dn_num_queries=8,
    num_groups=8,
)


class TinyBackbone(nn.Module):
    """res2..res5 at strides 4..32: one strided conv + ReLU per stage, or with `deep`, two
    3x3 convs with GroupNorm per stage (enough to learn from scratch)."""

    def __init__(self, channels=(8, 16, 24, 32), deep: bool = False):
        super().__init__()
        self.channels = channels
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

    def forward(self, x):
        features = {}
        for index, stage in enumerate(self.stages):
            x = stage(x)
            features[f"res{index + 2}"] = x
        return features


def tiny_model(seed: int = 0, encoder_overrides=None, **head_overrides) -> DIMaskDINO:
    torch.manual_seed(seed)
    backbone = TinyBackbone()
    shapes = backbone.output_shape()
    head_args = {**HEAD_DEFAULTS, **head_overrides}
    encoder_args = dict(
        hidden_dim=head_args["hidden_dim"],
        mask_dim=head_args["mask_dim"],
        num_levels=head_args.get("num_levels", 4),
        num_layers=1,
        num_heads=head_args["num_heads"],
        ffn_dim=64,
        num_groups=head_args["num_groups"],
    )
    encoder_args.update(encoder_overrides or {})
    encoder = MaskDINOEncoder({k: v.channels for k, v in shapes.items()}, {k: v.stride for k, v in shapes.items()}, **encoder_args)
    return DIMaskDINO(backbone, encoder, DIMaskDINOHead(**head_args))


def tiny_images(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=generator) * 255, torch.rand(3, 56, 80, generator=generator) * 255]


def tiny_targets():
    return [
        dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
        dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.3]])),
    ]


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

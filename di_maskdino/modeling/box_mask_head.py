"""The box-conditioned mask head: a mask for each kept query, predicted inside its box.

After Mask Frozen-DETR (Liang & Yuan, 2023, arXiv 2308.03747): a trained DETR-family
detector is kept frozen and a light mask network predicts every instance's mask inside the
detector's box. That paper names an image-feature encoder, a box-feature encoder and a query
encoder; its method text was not available to us beyond the abstract and its reviews, so the
three parts below are our own design under those names:

    image-feature encoder   convolutions over the stride-4 mask features, once per image
    box-feature encoder     RoIAlign (torchvision) of the encoded map inside each predicted
                            box, optionally fused with a finer backbone map and with the
                            detector's own mask logits; then query-conditioned convolutions
                            and upsampling to the mask resolution
    query encoder           an MLP of the decoder's query embedding; it conditions every
                            box-feature layer by a per-channel scale and shift (FiLM)

The mask logits live in the box frame: cell (i, j) of an M x M map covers the RoI box's
[j/M, (j+1)/M] x [i/M, (i+1)/M] (RoIAlign with aligned=True, pixel centres at +0.5), so
`postprocess.paste_box_masks` puts them back into the image. The RoI box is the detector's
box, optionally enlarged about its centre (`box_expansion`), so that an object reaching a
little beyond a too-tight box can still be masked. An optional mask-quality head
predicts the IoU of each mask with its object (as Mask Scoring R-CNN does) to rescale the
instance score.

Shape glossary: B images, n boxes (queries kept), D mask-feature channels, C query width,
E the head's width, h x w mask-feature resolution (1/4 of the padded input), R the RoI
resolution, M the mask resolution (R times a power of 2).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, roi_align

from ..layers import MLP, ConvNormAct, NormLayer, group_norm

__all__ = [
    "BoxMaskHead",
    "BoxHeadFeatures",
    "BoxMasks",
    "ImageFeatureEncoder",
    "QueryEncoder",
    "BoxFeatureEncoder",
    "QueryConditionedBlock",
    "MaskQualityHead",
    "box_rois",
]


@dataclass
class BoxHeadFeatures:
    """What the head reads from an image batch: `maps` (B, E, h, w), the encoded mask
    features; `fine` (B, C_f, H_f, W_f), the finer backbone map, or None."""

    maps: torch.Tensor
    fine: Optional[torch.Tensor] = None


@dataclass
class BoxMasks:
    """logits: (n, M, M) mask logits in the frame of `boxes` (n, 4), the RoI boxes as
    normalised cxcywh of the padded input; quality: (n,) logits of the predicted mask IoU,
    or None without a quality head."""

    logits: torch.Tensor
    boxes: torch.Tensor
    quality: Optional[torch.Tensor] = None


def box_rois(image_index: torch.Tensor, boxes: torch.Tensor, size) -> torch.Tensor:
    """(n,) image indices and (n, 4) normalised cxcywh boxes -> (n, 5) RoIAlign boxes
    (index, x0, y0, x1, y1) in pixels of a map of `size` (H, W) covering the padded input."""
    height, width = size
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * boxes.new_tensor([width, height, width, height]).float()
    return torch.cat([image_index.to(xyxy)[:, None], xyxy], dim=1)


class ImageFeatureEncoder(nn.Module):
    """The image-feature encoder: a 1x1 projection of the mask features to the head's
    width E, then `num_layers` residual 3x3 conv + norm + ReLU layers. (B, D, h, w) ->
    (B, E, h, w)."""

    def __init__(self, in_channels: int, dim: int, num_layers: int, norm_layer: NormLayer):
        super().__init__()
        self.project = ConvNormAct(in_channels, dim, 1, norm_layer=norm_layer)
        self.layers = nn.ModuleList(
            ConvNormAct(dim, dim, 3, norm_layer=norm_layer, act_layer=nn.ReLU) for _ in range(num_layers)
        )

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        x = self.project(mask_features)
        for layer in self.layers:
            x = x + layer(x)
        return x


class QueryEncoder(nn.Module):
    """The query encoder: LayerNorm then a 2-layer MLP of the query embedding. (n, C) -> (n, E)."""

    def __init__(self, query_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(query_dim)
        self.mlp = MLP(query_dim, dim, dim, 2)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(queries))


class QueryConditionedBlock(nn.Module):
    """One layer of the box-feature encoder: x + ReLU(FiLM_q(norm(conv3x3(x)))), where the
    query encoding q gives a per-channel scale (1 + gamma) and shift beta.
    x: (n, E, R, R), q: (n, E)."""

    def __init__(self, dim: int, norm_layer: NormLayer):
        super().__init__()
        self.conv = ConvNormAct(dim, dim, 3, norm_layer=norm_layer)
        self.film = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.film.weight)  # starts as an unconditioned residual conv
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(query)[:, :, None, None].chunk(2, dim=1)
        return x + F.relu(self.conv(x) * (1 + gamma) + beta)


class BoxFeatureEncoder(nn.Module):
    """The box-feature encoder after RoIAlign: the RoI features (plus, with a mask prior,
    the detector's mask logits in the box as one more channel) projected to E, then
    `num_layers` query-conditioned blocks at R x R, then `num_upsamplings` stride-2
    transposed convolutions to M = R * 2**num_upsamplings. (n, E(+1), R, R), (n, E) ->
    (n, E, M, M)."""

    def __init__(self, dim: int, num_layers: int, num_upsamplings: int, prior_channels: int, norm_layer: NormLayer):
        super().__init__()
        self.project = ConvNormAct(dim + prior_channels, dim, 1, norm_layer=norm_layer, act_layer=nn.ReLU)
        self.layers = nn.ModuleList(QueryConditionedBlock(dim, norm_layer) for _ in range(num_layers))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(dim, dim, 2, stride=2) for _ in range(num_upsamplings))

    def forward(self, roi_features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = self.project(roi_features)
        for layer in self.layers:
            x = layer(x, query)
        for upsample in self.upsample:
            x = F.relu(upsample(x))
        return x


class MaskQualityHead(nn.Module):
    """Predicted IoU of each mask with its object: the final box features and the mask
    probabilities, two stride-2 3x3 convolutions, global average pooling, a linear layer.
    (n, E, M, M), (n, M, M) -> (n,) logits (sigmoid = predicted IoU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(dim + 1, dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.score = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        x = torch.cat([features, mask_logits.sigmoid()[:, None]], dim=1)
        return self.score(self.convs(x).mean(dim=(2, 3)))[:, 0]


class BoxMaskHead(nn.Module):
    """
    Args:
        mask_dim: D, channels of the detector's mask features.
        query_dim: C, width of the decoder's query embeddings.
        dim: E, the head's width.
        roi_size: R, RoIAlign resolution.
        mask_size: M, output resolution (R times a power of 2: 28/56 for R = 14/28).
        image_encoder_layers: residual conv layers of the image-feature encoder.
        box_encoder_layers: query-conditioned layers of the box-feature encoder.
        fine_channels: channels of a finer backbone map fused into the box features
            (RoIAlign of that map, 1x1 projection, added), or None.
        mask_prior: also read the detector's mask logits of each query inside its box, as
            an input channel and as the starting point of the output (the output layer is
            zero-initialised, so an untrained head reproduces the detector's mask).
        box_expansion: the RoI box is the detector's box with width and height times this.
        quality: the mask-quality head, or None.
        norm_layer: norm of the convolutions (default GroupNorm, 8 groups).
    """

    def __init__(
        self,
        *,
        mask_dim: int,
        query_dim: int,
        dim: int = 128,
        roi_size: int = 28,
        mask_size: int = 56,
        image_encoder_layers: int = 1,
        box_encoder_layers: int = 4,
        fine_channels: Optional[int] = None,
        mask_prior: bool = True,
        box_expansion: float = 1.0,
        quality: Optional[MaskQualityHead] = None,
        norm_layer: Optional[NormLayer] = None,
    ):
        super().__init__()
        upsamplings = (mask_size // roi_size).bit_length() - 1
        if roi_size < 1 or mask_size != roi_size * 2**upsamplings:
            raise ValueError(
                f"BoxMaskHead: the mask size ({mask_size}) must be the RoI size ({roi_size}) times a power of 2"
            )
        if box_expansion < 1.0:
            raise ValueError(f"BoxMaskHead: box_expansion must be at least 1, got {box_expansion}")
        self.box_expansion = box_expansion
        norm_layer = norm_layer or group_norm(8)
        self.roi_size = roi_size
        self.mask_size = mask_size
        self.mask_prior = mask_prior
        self.image_encoder = ImageFeatureEncoder(mask_dim, dim, image_encoder_layers, norm_layer)
        self.fine_projection = (
            ConvNormAct(fine_channels, dim, 1, norm_layer=norm_layer) if fine_channels is not None else None
        )
        self.query_encoder = QueryEncoder(query_dim, dim)
        self.box_encoder = BoxFeatureEncoder(dim, box_encoder_layers, upsamplings, int(mask_prior), norm_layer)
        self.predictor = nn.Conv2d(dim, 1, 1)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)
        self.quality = quality

    def encode_image(self, mask_features: torch.Tensor, fine: Optional[torch.Tensor] = None) -> BoxHeadFeatures:
        """The per-image part, run once per batch: (B, D, h, w) mask features and the finer
        backbone map (when the head fuses one) -> BoxHeadFeatures."""
        if (fine is None) != (self.fine_projection is None):
            raise ValueError(
                "BoxMaskHead: a finer backbone map must be given exactly when the head was built to fuse one "
                f"(built with fine_channels={'set' if self.fine_projection is not None else 'None'})"
            )
        return BoxHeadFeatures(self.image_encoder(mask_features), fine)

    def forward(
        self,
        features: BoxHeadFeatures,
        image_index: torch.Tensor,
        boxes: torch.Tensor,
        queries: torch.Tensor,
        prior: Optional[torch.Tensor] = None,
    ) -> BoxMasks:
        """
        Args:
            features: `encode_image`'s output for the batch.
            image_index: (n,) int64, the image of each box.
            boxes: (n, 4) normalised cxcywh of the padded input (the detector's boxes; the
                RoI boxes are these enlarged by `box_expansion`).
            queries: (n, C) the query embeddings of those boxes.
            prior: (n, h, w) the detector's mask logits of those queries (with `mask_prior`).
        """
        if self.mask_prior and prior is None:
            raise ValueError("BoxMaskHead: built with mask_prior, it needs the detector's mask logits (prior)")
        maps = features.maps
        size = (self.roi_size, self.roi_size)
        boxes = boxes * boxes.new_tensor([1.0, 1.0, self.box_expansion, self.box_expansion])
        rois = box_rois(image_index, boxes, maps.shape[-2:]).to(maps.dtype)
        x = roi_align(maps, rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        if self.fine_projection is not None:
            fine_rois = box_rois(image_index, boxes, features.fine.shape[-2:]).to(features.fine.dtype)
            fine = roi_align(features.fine, fine_rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
            x = x + self.fine_projection(fine.to(x.dtype))
        prior_at_mask = None
        if self.mask_prior:
            # each prior is its own one-channel "image": RoI k reads image k
            own = torch.arange(boxes.shape[0], device=boxes.device)
            prior = prior[:, None].to(maps.dtype)
            prior_rois = box_rois(own, boxes, prior.shape[-2:]).to(maps.dtype)
            x = torch.cat([x, roi_align(prior, prior_rois, size, 1.0, 0, aligned=True)], dim=1)
            mask = (self.mask_size, self.mask_size)
            prior_at_mask = roi_align(prior, prior_rois, mask, 1.0, 0, aligned=True)[:, 0]
        x = self.box_encoder(x, self.query_encoder(queries))
        logits = self.predictor(x)[:, 0]
        if prior_at_mask is not None:
            logits = logits + prior_at_mask
        quality = self.quality(x, logits) if self.quality is not None else None
        return BoxMasks(logits, boxes, quality)

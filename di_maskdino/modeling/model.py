"""The whole DI-MaskDINO network, independent of detectron2: normalisation and padding,
backbone, encoder, head, and inference.

Shape glossary: B batch, 3 x H x W images (RGB, 0-255 unless the pixel statistics say
otherwise), K classes.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .di_maskdino_head import DIMaskDINOHead
from .encoder import MaskDINOEncoder
from .outputs import DIMaskDINOOutput, Predictions, RawDetections
from .postprocess import Detections, detections_from_raw, instance_inference

__all__ = ["DIMaskDINO", "pad_images"]


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Stacks (3, H_i, W_i) images into (B, 3, H, W), zero-padded at the bottom/right to the
    largest size rounded up to `size_divisibility`; returns the batch and the (H_i, W_i)."""
    if len(images) == 0:
        raise ValueError("pad_images: no image given")
    sizes = [tuple(int(s) for s in image.shape[-2:]) for image in images]
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for index, (image, (h, w)) in enumerate(zip(images, sizes)):
        batch[index, :, :h, :w] = image
    return batch, sizes


class DIMaskDINO(nn.Module):
    """
    Args:
        backbone: module mapping (B, 3, H, W) to named feature maps (see `backbone.py`).
        encoder: the MaskDINO encoder built for that backbone's outputs.
        head: the DI-MaskDINO head.
        pixel_mean, pixel_std: per-channel normalisation of the input images.
        size_divisibility: inputs are padded to a multiple of this.
        test_topk: instances kept per image at inference.
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder: MaskDINOEncoder,
        head: DIMaskDINOHead,
        *,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        size_divisibility: int = 32,
        test_topk: int = 100,
    ):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.head = head
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def predicts_masks(self) -> bool:
        """False for a detection-only model (no mask branch)."""
        return self.encoder.predicts_masks

    def preprocess(self, images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalises (3, H_i, W_i) images and pads them into one batch (the padding is 0
        after normalisation)."""
        device = self.pixel_mean.device
        normalised = [
            (image.to(device=device, dtype=torch.float32) - self.pixel_mean) / self.pixel_std for image in images
        ]
        return pad_images(normalised, self.size_divisibility)

    def run(
        self,
        batch: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        all_layer_masks: Optional[bool] = None,
    ) -> DIMaskDINOOutput:
        """batch: (B, 3, H, W) preprocessed images; targets: see `DIMaskDINOHead.forward`.

        (`forward` does the same here; detectron2's meta-architecture overrides `forward` to
        take detectron2's batched inputs and keeps this.)"""
        features = self.backbone(batch)
        return self.head(self.encoder(features), targets=targets, all_layer_masks=all_layer_masks)

    def forward(self, batch, targets=None, all_layer_masks=None) -> DIMaskDINOOutput:
        return self.run(batch, targets, all_layer_masks)

    def detect(self, batch: torch.Tensor) -> RawDetections:
        """Inference on a preprocessed batch (B, 3, H, W): the `test_topk` best (query,
        class) pairs of every image with their boxes and the mask logits of their queries
        (see `RawDetections`). Output shapes depend only on the input's, so this is the
        function `torch.export` captures (`di_maskdino.export`)."""
        return self.head.detect(self.encoder(self.backbone(batch)), self.test_topk)

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[torch.Tensor],
        output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        *,
        score_threshold: float = 0.0,
        max_detections: Optional[int] = None,
    ) -> List[Detections]:
        """Detections for each (3, H_i, W_i) image, reported at `output_sizes` (default: the
        input sizes); see `postprocess.detections_from_raw` for the two filters."""
        batch, sizes = self.preprocess(images)
        output_sizes = sizes if output_sizes is None else output_sizes
        return detections_from_raw(
            self.detect(batch),
            sizes,
            tuple(batch.shape[-2:]),
            output_sizes,
            score_threshold=score_threshold,
            max_detections=max_detections,
        )

    def instances(
        self,
        prediction: Predictions,
        image_sizes: Sequence[Tuple[int, int]],
        padded_size: Tuple[int, int],
        output_sizes: Sequence[Tuple[int, int]],
    ) -> List[Detections]:
        """Detections of every image of one output (any layer; box-only outputs give no masks).

        image_sizes: (H_i, W_i) before padding; padded_size: the batch's (H, W);
        output_sizes: (H, W) to report each image at."""
        return [
            instance_inference(
                prediction.logits[i],
                prediction.boxes[i],
                None if prediction.masks is None else prediction.masks[i],
                tuple(image_sizes[i]),
                tuple(padded_size),
                tuple(output_sizes[i]),
                self.test_topk,
            )
            for i in range(prediction.logits.shape[0])
        ]

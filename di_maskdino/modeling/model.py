"""The whole DI-MaskDINO network, independent of detectron2: normalisation and padding,
backbone, encoder, head, the optional box-conditioned mask head, and inference.

Shape glossary: B batch, 3 x H x W images (RGB, 0-255 unless the pixel statistics say
otherwise), K classes.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .box_mask_head import BoxMaskHead, BoxMasks
from .di_maskdino_head import DIMaskDINOHead
from .encoder import MaskDINOEncoder
from .outputs import DIMaskDINOOutput, Predictions, RawDetections
from .padding import BATCH_STATISTICS_ERROR, ImagePadding, check_padding_mask_support
from .postprocess import Detections, box_mask_detections, detections_from_raw, instance_inference, top_pairs
from .segmentation_inference import SegmentationInference

__all__ = ["DIMaskDINO", "pad_images", "PIXEL_MEAN", "PIXEL_STD", "TEST_MASKS"]

# the per-channel statistics (RGB, 0-255) of ImageNet that torchvision's and the release's
# backbones were trained on: the model's default input normalisation
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
# the masks a model with a box mask head reports: the head's ("refined"), the detector's own
# ("detector"), or the refined ones with the detector's beside them for evaluation ("both")
TEST_MASKS = ("refined", "detector", "both")


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
        box_mask_head: the box-conditioned mask head (refined masks), or None.
        fine_feature: the backbone map the box mask head fuses (e.g. "res2"), "image" for the
            preprocessed input itself, or None.
        test_masks: with a box mask head, the masks inference reports (`TEST_MASKS`).
        segmentation: panoptic / semantic inference over things and stuff, or None
            (instances only).
        padding_mask: make the padded region of a batch invisible to the images (see
            `padding.py`): an image's predictions then do not depend on the other images of
            its batch. Off, as in the release, the padding takes part in the network. Needs
            the image sizes (`run(..., image_sizes=)`) and a convolutional backbone.

    The detector is everything but `box_mask_head`. In training, a detector none of whose
    parameters requires grad (frozen) runs as at inference - eval mode, no denoising
    queries, masks of the final layer only - without autograd, so that training only the
    box mask head costs little more than inference.
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder: MaskDINOEncoder,
        head: DIMaskDINOHead,
        *,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        size_divisibility: int = 32,
        test_topk: int = 100,
        box_mask_head: Optional[BoxMaskHead] = None,
        fine_feature: Optional[str] = None,
        test_masks: str = "refined",
        segmentation: Optional[SegmentationInference] = None,
        padding_mask: bool = False,
    ):
        super().__init__()
        if padding_mask:
            check_padding_mask_support(backbone)
            if box_mask_head is not None:
                raise ValueError(
                    "DIMaskDINO: the padding mask does not cover the box mask head yet; turn one of them off"
                )
            checkpointing = [
                name
                for name, on in (
                    ("backbone", getattr(backbone, "grad_checkpointing", False)),
                    ("encoder", encoder.grad_checkpointing),
                    ("decoder", head.decoder.grad_checkpointing),
                )
                if on
            ]
            if checkpointing:
                raise ValueError(
                    f"DIMaskDINO: the padding mask does not reach the recomputation of activation checkpointing "
                    f"(on in the {', '.join(checkpointing)}); turn one of them off"
                )
        if (fine_feature is not None) != (box_mask_head is not None and box_mask_head.fine_projection is not None):
            raise ValueError("DIMaskDINO: fine_feature names the backbone map a box mask head fuses, and only that")
        if test_masks not in TEST_MASKS:
            raise ValueError(f"DIMaskDINO: test_masks must be one of {TEST_MASKS}, got {test_masks!r}")
        self.backbone = backbone
        self.encoder = encoder
        self.head = head
        self.box_mask_head = box_mask_head
        self.fine_feature = fine_feature
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        self.test_masks = test_masks
        self.segmentation = segmentation
        self.padding_mask = padding_mask
        self._padding: Optional[ImagePadding] = None  # the batch being run (padding mask only)
        if padding_mask:
            # NOTE: registered once, not per forward pass, so that torch.compile traces them
            # without graph breaks; they act while `masked` holds a padding. A bound method, so
            # that a deep copy of the model (EMA) hooks its own copy.
            self._batch_norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for module in ImagePadding.hooked_modules(backbone, encoder, head):
                module.register_forward_hook(self._mask_padding)
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def predicts_masks(self) -> bool:
        """False for a detection-only model (no mask branch)."""
        return self.encoder.predicts_masks

    @property
    def reports_refined_masks(self) -> bool:
        """Whether inference reports the box mask head's refined masks: a head tested on its own
        masks, in an instance model (panoptic / semantic inference reports the detector's)."""
        return self.box_mask_head is not None and self.test_masks != "detector" and self.segmentation is None

    def instance_class_mask(self) -> Optional[torch.Tensor]:
        """(K,) bool, the classes inference reports as instances - the things of a panoptic /
        semantic model over things and stuff - or None: every class. A model whose classes are
        all stuff has no instances: ValueError."""
        if self.segmentation is None or not self.segmentation.has_stuff:
            return None
        if not bool(self.segmentation.is_thing.any()):
            raise ValueError(
                "every class of this model is stuff (semantic segmentation), so it has no instances to predict; "
                "evaluate its semantic output with tools/train_net.py --eval-only"
            )
        return self.segmentation.is_thing

    def preprocess(self, images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalises (3, H_i, W_i) images and pads them into one batch (the padding is 0
        after normalisation)."""
        device, dtype = self.pixel_mean.device, self.pixel_mean.dtype  # float32, or the model's (float64) dtype
        normalised = [(image.to(device=device, dtype=dtype) - self.pixel_mean) / self.pixel_std for image in images]
        return pad_images(normalised, self.size_divisibility)

    def image_padding(self, batch: torch.Tensor, image_sizes) -> Optional[ImagePadding]:
        """The valid regions of a padded batch when the model has a padding mask, else None.
        image_sizes: (h, w) per image, a list or a (B, 2) tensor."""
        if not self.padding_mask:
            return None
        if image_sizes is None:
            raise ValueError(
                "DIMaskDINO: a model with a padding mask needs the image sizes before padding "
                "(run(batch, image_sizes=...), detect(batch, image_sizes))"
            )
        if not isinstance(image_sizes, torch.Tensor):
            image_sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.long)
        height, width = batch.shape[-2:]
        if image_sizes.dim() != 2 or tuple(image_sizes.shape) != (batch.shape[0], 2):
            raise ValueError(
                f"DIMaskDINO: image_sizes must be ({batch.shape[0]}, 2), the (h, w) of each image before padding; "
                f"got {tuple(image_sizes.shape)}"
            )
        if self.training and any(m.training for m in self._batch_norms):
            raise ValueError(BATCH_STATISTICS_ERROR)
        # the values where reading them costs nothing (on the host, not traced)
        if image_sizes.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool((image_sizes < 1).any()) or bool((image_sizes > image_sizes.new_tensor([height, width])).any()):
                raise ValueError(
                    f"DIMaskDINO: image_sizes must lie within the padded batch's {height} x {width} (and be at "
                    f"least 1); got {image_sizes.tolist()}"
                )
            # every image fills a canvas that each map divides evenly: nothing to mask, and the
            # masked network computes what the network without the mask computes
            stride = self.encoder.coarsest_stride
            if (
                height % stride == 0
                and width % stride == 0
                and bool((image_sizes == image_sizes.new_tensor([height, width])).all())
            ):
                return None
            host_sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
            return ImagePadding(image_sizes.to(batch.device), (height, width), host_sizes)
        return ImagePadding(image_sizes.to(batch.device), (height, width))

    def _mask_padding(self, module: nn.Module, inputs, output):
        return output if self._padding is None else self._padding.hook(module, inputs, output)

    @contextlib.contextmanager
    def masked(self, padding: Optional[ImagePadding]):
        """The context in which the convolutions and norms of the backbone, the encoder and
        BATO leave the padded region out (no-op without a padding)."""
        previous, self._padding = self._padding, padding
        try:
            yield
        finally:
            self._padding = previous

    def encode(self, batch: torch.Tensor, padding: Optional[ImagePadding] = None):
        """Backbone maps and encoder output of a preprocessed batch."""
        features = self.backbone(batch)
        return features, self.encoder(features, padding)

    def run(
        self,
        batch: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        all_layer_masks: Optional[bool] = None,
        factored_masks: Optional[bool] = None,
        image_sizes=None,
    ) -> DIMaskDINOOutput:
        """batch: (B, 3, H, W) preprocessed images; targets, all_layer_masks, factored_masks:
        see `DIMaskDINOHead.forward`; image_sizes: (h, w) of every image before padding
        (needed, and only read, with a padding mask: its boxes and targets are then
        normalised by the images, not by the padded batch).

        (`forward` does the same here; detectron2's meta-architecture overrides `forward` to
        take detectron2's batched inputs and keeps this.)"""
        frozen = self.training and not self.detector_trains
        padding = self.image_padding(batch, image_sizes)
        with self.detector_frozen() if frozen else contextlib.nullcontext(), self.masked(padding):
            features, encoded = self.encode(batch, padding)
            output = self.head(
                encoded,
                targets=None if frozen else targets,
                all_layer_masks=all_layer_masks,
                factored_masks=factored_masks,
            )
        output.padding = padding
        if self.box_mask_head is not None:
            fine = batch if self.fine_feature == "image" else features.get(self.fine_feature)
            output.box_features = self.box_mask_head.encode_image(encoded.mask_features, fine)
        return output

    def detector_parameters(self):
        """(name, parameter) of the detector: every parameter but the box mask head's."""
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("box_mask_head."))

    @property
    def detector_trains(self) -> bool:
        return any(p.requires_grad for _, p in self.detector_parameters())

    @contextlib.contextmanager
    def detector_frozen(self):
        """The detector in eval mode and without autograd, for the duration."""
        parts = [self.backbone, self.encoder, self.head]
        modes = [part.training for part in parts]
        try:
            for part in parts:
                part.eval()
            with torch.no_grad():
                yield
        finally:
            for part, mode in zip(parts, modes):
                part.train(mode)

    def box_masks(self, output: DIMaskDINOOutput, image: torch.Tensor, query: torch.Tensor) -> BoxMasks:
        """The box mask head's masks for queries `query` (n,) of images `image` (n,) of the
        final layer of `output` (whose boxes are the RoIs, without gradient)."""
        if self.box_mask_head is None or output.box_features is None:
            raise ValueError("DIMaskDINO.box_masks: the model has no box-conditioned mask head")
        final = output.final
        prior = final.masks[image, query] if self.box_mask_head.mask_prior else None
        return self.box_mask_head(
            output.box_features, image, final.boxes[image, query].detach(), final.embeddings[image, query], prior
        )

    def forward(self, batch, targets=None, all_layer_masks=None, image_sizes=None) -> DIMaskDINOOutput:
        return self.run(batch, targets, all_layer_masks, image_sizes=image_sizes)

    def detect(self, batch: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> RawDetections:
        """Inference on a preprocessed batch (B, 3, H, W): the `test_topk` best (query,
        class) pairs of every image with their boxes and the mask logits of their queries
        (see `RawDetections`). Output shapes depend only on the input's, so this is the
        function `torch.export` captures (`di_maskdino.export`).

        image_sizes: (B, 2) (h, w) before padding, read with a padding mask only; the boxes
        and masks are then given in the padded frame, as without one (`canvas_frame`)."""
        padding = self.image_padding(batch, image_sizes)
        if self._detects_on_own_canvas(padding):
            return self._detect_on_own_canvas(batch, padding)
        with self.masked(padding):
            raw = self.head.detect(self.encode(batch, padding)[1], self.test_topk)
        if padding is None:
            return raw
        masks = None if raw.mask_logits is None else padding.replicate_edges(raw.mask_logits)
        return RawDetections(raw.scores, raw.labels, padding.canvas_frame_boxes(raw.boxes), masks)

    def _detects_on_own_canvas(self, padding: Optional[ImagePadding]) -> bool:
        """Whether `detect` runs a single padded image on the image itself: with its size known
        on the host and at least the coarsest stride (whose maps then tell their strides)."""
        if padding is None or padding.host_sizes is None or len(padding.host_sizes) != 1:
            return False
        return min(padding.host_sizes[0]) >= self.encoder.coarsest_stride

    def _detect_on_own_canvas(self, batch: torch.Tensor, padding: ImagePadding) -> RawDetections:
        """`detect` of one image on a canvas that ends with it: what the mask computes on the
        padded canvas (every map of the image holds ceil(h / s) x ceil(w / s) cells either
        way), without masking work. Its outputs are then placed on the padded canvas."""
        height, width = padding.host_sizes[0]
        own = ImagePadding(padding.image_sizes, (height, width), padding.host_sizes)
        # every map of its own canvas is the image's: nothing for the hooks to mask
        raw = self.head.detect(self.encode(batch[..., :height, :width], own)[1], self.test_topk)
        masks = raw.mask_logits
        if masks is not None:
            rows, cols = own.map_shape(masks.shape[-2:], padding.canvas)
            masks = F.pad(masks, (0, cols - masks.shape[-1], 0, rows - masks.shape[-2]), mode="replicate")
        return RawDetections(raw.scores, raw.labels, padding.canvas_frame_boxes(raw.boxes), masks)

    def canvas_frame(self, prediction: Predictions, image_sizes, padded_size: Tuple[int, int]) -> Predictions:
        """With a padding mask, `prediction` (boxes normalised by the images, masks zero in
        the padding) as post-processing reads it: boxes normalised by the padded batch and
        mask logits whose image edge is repeated over the padding (what resizing then reads
        beyond the image, as at the border of a batch that ends with it). Unchanged without."""
        if not self.padding_mask:
            return prediction
        padding = ImagePadding.of(image_sizes, padded_size, prediction.boxes.device)
        masks = prediction.masks
        return Predictions(
            prediction.logits,
            padding.canvas_frame_boxes(prediction.boxes),
            None if masks is None else padding.replicate_edges(masks),
            embeddings=prediction.embeddings,
        )

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
        input sizes); see `postprocess.detections_from_raw` for the two filters. With a box
        mask head, its masks."""
        batch, sizes = self.preprocess(images)
        output_sizes = sizes if output_sizes is None else output_sizes
        if self.box_mask_head is not None:
            found = self.refined_instances(self.run(batch), sizes, tuple(batch.shape[-2:]), output_sizes)
            return [d.filtered(score_threshold, max_detections) for d in found]
        image_sizes = torch.tensor(sizes, dtype=torch.long) if self.padding_mask else None
        return detections_from_raw(
            self.detect(batch, image_sizes),
            sizes,
            tuple(batch.shape[-2:]),
            output_sizes,
            score_threshold=score_threshold,
            max_detections=max_detections,
        )

    def refined_instances(
        self,
        output: DIMaskDINOOutput,
        image_sizes: Sequence[Tuple[int, int]],
        padded_size: Tuple[int, int],
        output_sizes: Sequence[Tuple[int, int]],
    ) -> List[Detections]:
        """Detections of the final layer with the box mask head's masks: the same (query,
        class) pairs as `instances` keeps, one head pass for all images of the batch."""
        final = output.final
        pairs = [top_pairs(final.logits[i], self.test_topk) for i in range(final.logits.shape[0])]
        image = torch.cat([torch.full_like(query, i) for i, (_, query, _) in enumerate(pairs)])
        query = torch.cat([query for _, query, _ in pairs])
        masks = self.box_masks(output, image, query)
        results, start = [], 0
        for i, (scores, kept, labels) in enumerate(pairs):
            part = slice(start, start + kept.shape[0])
            start += kept.shape[0]
            results.append(
                box_mask_detections(
                    scores,
                    labels,
                    final.boxes[i, kept],
                    masks.logits[part],
                    masks.boxes[part],
                    None if masks.quality is None else masks.quality[part],
                    tuple(image_sizes[i]),
                    tuple(padded_size),
                    tuple(output_sizes[i]),
                )
            )
        return results

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
        prediction = self.canvas_frame(prediction, image_sizes, padded_size)
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

"""Batch inference: images in, instances out, from a model in memory or an exported one.

    from di_maskdino import Predictor
    predictor = Predictor.from_model(model)                                # a DIMaskDINO in memory
    predictor = Predictor.from_exported("output/export/model_aoti.pt2")    # no model code
    results = predictor(["a.jpg", rgb_uint8_array, chw_uint8_tensor])

With detectron2, `di_maskdino.d2.build_predictor(cfg)` builds one from a config and its
weights, giving detectron2 `Instances`.

Every image is read (paths, EXIF-upright), put in the channel order the network expects,
resized as at test time (shortest edge, `min_size` / `max_size`), normalised and padded into
batches of `batch_size`; the results are reported at each image's original size, as the
core's `Detections` (or what `convert` makes of them). Arrays and tensors hold 0-255 pixel
values as uint8; float ones are accepted when the caller states the value of white
(`float_input_max`: 255.0 for 0-255 floats, 1.0 for 0-1 floats). The same post-processing
(`postprocess.detections_from_raw`) serves the eager and the exported models, so they give
the same instances (an export holds the detector's inference: a model whose box mask head
refines its masks is not exported).

On the CPU, `di_maskdino.cpu_inference` offers speed-ups that a caller chooses
(`from_model(..., cpu_inference=CPUInference())`); the demo uses them.

NOTE: like the release, the model has no padding mask: an image batched with larger ones
is padded further and its predictions change slightly. `batch_size=1` reproduces the
single-image results exactly.
"""

import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from .cpu_inference import CPUInference, speedups_context
from .images import read_image_rgb, resize_image, shortest_edge_size
from .modeling.model import pad_images
from .modeling.outputs import RawDetections
from .modeling.postprocess import Detections, detections_from_raw
from .modeling.segmentation_inference import thing_detections

__all__ = ["Predictor", "ImageInput"]

ImageInput = Union[str, "os.PathLike[str]", np.ndarray, torch.Tensor]
# (preprocessed batch (B, 3, H, W), image sizes before padding (B, 2) int64) -> network output
Backend = Callable[[torch.Tensor, torch.Tensor], Any]
# (an image's detections, its original (H, W)) -> what the predictor returns for it
Convert = Callable[[Detections, Tuple[int, int]], Any]
# (network output, image sizes, padded size, output sizes, score_threshold, max_detections) -> detections
Postprocess = Callable[[Any, List[Tuple[int, int]], Tuple[int, int], List[Tuple[int, int]], float, Optional[int]], list]


def _raw_detections(raw: RawDetections, sizes, padded_size, output_sizes, score_threshold, max_detections):
    return detections_from_raw(
        raw, sizes, padded_size, output_sizes, score_threshold=score_threshold, max_detections=max_detections
    )


class Predictor:
    """
    Args:
        backend: (preprocessed batch (B, 3, H, W), (B, 2) int64 (h, w) of the images before
            padding) -> network output (see the constructors), which `postprocess` turns into
            detections. (The sizes matter to a model with a padding mask.)
        postprocess: network output -> per-image `Detections` (see `Postprocess`); the
            default, `detections_from_raw`, reads `RawDetections`.
        pixel_mean, pixel_std: normalisation, in the network's channel order.
        size_divisibility: batches are padded to a multiple of it.
        model_format: channel order the network expects ("RGB" or "BGR").
        input_format: channel order of the arrays and tensors given to the predictor (files
            are read as RGB).
        float_input_max: the value of white in float arrays and tensors (255.0 for 0-255
            values, 1.0 for 0-1 values); None refuses float input (uint8 is always taken).
        min_size, max_size: test-time shortest-edge resizing; min_size 0 keeps the size.
        score_threshold: instances scoring below it are dropped.
        max_detections: at most this many instances per image (the best by score).
        batch_size: images per network call.
        device: where the inputs go (the backend's device).
        convert: (detections, original (H, W)) -> what is returned per image (e.g.
            `di_maskdino.d2.detections_to_instances` for detectron2 `Instances`); None: the
            `Detections` themselves.
        class_names: optional names of the classes (for drawing).
        class_mask: (K,) bool, the classes to report (e.g. the things of a panoptic model),
            None: all; applied after `max_detections`, as the detectron2 model does.
        max_image_size: the largest padded side the backend takes (an exported model's
            limit), None: no limit.
        min_padded_size: batches are padded to at least this many pixels per side (an
            exported model's smallest input), rounded up to `size_divisibility`.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        postprocess: Postprocess = _raw_detections,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        model_format: str = "RGB",
        input_format: str = "RGB",
        float_input_max: Optional[float] = None,
        min_size: int = 0,
        max_size: int = 0,
        score_threshold: float = 0.0,
        max_detections: Optional[int] = 100,
        batch_size: int = 1,
        device: Union[str, torch.device] = "cpu",
        convert: Optional[Convert] = None,
        class_names: Sequence[str] = (),
        class_mask: Optional[torch.Tensor] = None,
        max_image_size: Optional[int] = None,
        min_padded_size: int = 0,
    ):
        for name, value in (("model_format", model_format), ("input_format", input_format)):
            if value not in ("RGB", "BGR"):
                raise ValueError(f"Predictor: {name} must be 'RGB' or 'BGR', got {value!r}")
        if float_input_max is not None and not float_input_max > 0:
            raise ValueError(f"Predictor: float_input_max must be positive (or None), got {float_input_max}")
        if batch_size < 1:
            raise ValueError(f"Predictor: batch_size must be at least 1, got {batch_size}")
        if max_detections is not None and max_detections < 1:
            raise ValueError(f"Predictor: max_detections must be at least 1 (or None), got {max_detections}")
        self.backend = backend
        self.postprocess = postprocess
        self.device = torch.device(device)
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.size_divisibility = size_divisibility
        self.model_format = model_format
        self.input_format = input_format
        self.float_input_max = float_input_max
        self.min_size = min_size
        self.max_size = max_size
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.batch_size = batch_size
        self.convert = convert
        self.max_image_size = max_image_size
        self.min_padded_size = min_padded_size
        self.class_names = list(class_names)
        if class_mask is not None:
            class_mask = torch.as_tensor(class_mask)
            if class_mask.dtype != torch.bool or class_mask.dim() != 1:
                raise ValueError(
                    f"Predictor: class_mask must be a (K,) bool vector (True: report the class), got "
                    f"{class_mask.dtype} of shape {tuple(class_mask.shape)}"
                )
        self.class_mask = class_mask

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, *, cpu_inference: Optional[CPUInference] = None, **kwargs) -> "Predictor":
        """A predictor running `model` (a `DIMaskDINO`, put in evaluation mode) eagerly, with
        the model's normalisation, size divisibility and `test_topk`, and giving the instances
        the model's own inference gives (`DIMaskDINOArch.forward` for a detectron2 model):
        - the detector's (`model.detect`);
        - with a box mask head, the head's refined masks (`model.refined_instances`), unless
          the model tests the detector's own masks (`test_masks == "detector"`) or is a
          panoptic / semantic model (its instances come from the detector);
        - with panoptic / semantic inference over things and stuff (`model.segmentation`),
          the things only (`class_mask`).
        cpu_inference: CPU speed-ups to run the model with (`di_maskdino.cpu_inference`),
        None: the plain model."""
        model.eval()

        def speedups(batch_shape):
            return speedups_context(cpu_inference, batch_shape, model.pixel_mean.device)

        class_mask = model.instance_class_mask()
        if class_mask is not None:
            kwargs.setdefault("class_mask", class_mask)
        refined = model.reports_refined_masks
        if refined:

            def backend(batch: torch.Tensor, image_sizes: torch.Tensor):
                with torch.inference_mode(), speedups(batch.shape):
                    return model.run(batch, image_sizes=image_sizes)

            def postprocess(output, sizes, padded_size, output_sizes, score_threshold, max_detections):
                with torch.inference_mode(), speedups((len(sizes), 3, *padded_size)):
                    found = model.refined_instances(output, sizes, padded_size, output_sizes)
                return [f.filtered(score_threshold, max_detections) for f in found]

            kwargs.setdefault("postprocess", postprocess)
        else:

            def backend(batch: torch.Tensor, image_sizes: torch.Tensor) -> RawDetections:
                with torch.inference_mode(), speedups(batch.shape):
                    return model.detect(batch, image_sizes)

        kwargs.setdefault("device", model.pixel_mean.device)
        return cls(
            backend,
            pixel_mean=model.pixel_mean.flatten().tolist(),
            pixel_std=model.pixel_std.flatten().tolist(),
            size_divisibility=model.size_divisibility,
            **kwargs,
        )

    @classmethod
    def from_exported(cls, path: str, *, device: str = "cpu", onnx_threads: Optional[int] = None, **kwargs):
        """A predictor running an exported model (`tools/export_model.py`: a torch.export
        archive, an AOTInductor package or an ONNX model); the input convention comes from
        the metadata stored in it, the other arguments as in the constructor."""
        from .export.metadata import MIN_IMAGE_SIZE
        from .export.runtime import ExportedDetector

        detector = ExportedDetector(path, device=device, onnx_threads=onnx_threads)
        meta = detector.metadata
        settings = dict(
            model_format=meta.input_format,
            min_size=meta.min_size,
            max_size=meta.max_size,
            max_detections=meta.test_topk,
            class_names=meta.class_names,
        )
        if meta.instance_classes is not None:
            mask = torch.zeros(meta.num_classes, dtype=torch.bool)
            mask[list(meta.instance_classes)] = True
            settings["class_mask"] = mask
        settings.update(kwargs)
        return cls(
            detector,
            pixel_mean=meta.pixel_mean,
            pixel_std=meta.pixel_std,
            size_divisibility=meta.size_divisibility,
            device=device,
            max_image_size=meta.max_image_size,
            min_padded_size=MIN_IMAGE_SIZE,
            **settings,
        )

    # -- inference ------------------------------------------------------------------------

    def _prepare(self, image: ImageInput, index: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(3, H', W') float32 tensor in the network's channel order, resized, and the
        image's original (H, W)."""
        source_format = self.input_format
        if isinstance(image, (str, os.PathLike)):
            image, source_format = read_image_rgb(os.fspath(image)), "RGB"
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"Predictor: image {index} must be an (H, W, 3) array, got shape {image.shape}")
            original = tuple(image.shape[:2])
            image = self._pixels(
                image, index, str(image.dtype), image.dtype == np.uint8, np.issubdtype(image.dtype, np.floating)
            )
            tensor = torch.from_numpy(np.ascontiguousarray(self._resized(image).transpose(2, 0, 1)))
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"Predictor: image tensor {index} must be (3, H, W), got shape {tuple(image.shape)}")
            original = tuple(image.shape[-2:])
            image = self._pixels(image, index, str(image.dtype), image.dtype == torch.uint8, image.is_floating_point())
            tensor = self._resized_tensor(image)
        else:
            raise TypeError(
                f"Predictor: image {index} is a {type(image).__name__}; give file paths, (H, W, 3) numpy arrays "
                "or (3, H, W) tensors"
            )
        if source_format != self.model_format:
            tensor = tensor.flip(0)
        return tensor.to(self.device, torch.float32), original

    def _pixels(self, image, index: int, dtype: str, is_uint8: bool, is_float: bool):
        """`image` with 0-255 values: uint8 as it is, floats scaled by 255 / float_input_max;
        any other element type, or floats without a stated range, is refused."""
        if is_uint8:
            return image
        if not is_float:
            raise TypeError(f"Predictor: image {index} has elements of type {dtype}; give uint8 pixels (0-255)")
        if self.float_input_max is None:
            raise TypeError(
                f"Predictor: image {index} is a {dtype} array or tensor, and the range of float pixels is not known: "
                "give uint8 pixels (0-255), or state the value of white with Predictor(..., float_input_max=255.0) "
                "for 0-255 floats or float_input_max=1.0 for 0-1 floats"
            )
        scaled = image.astype(np.float32) if isinstance(image, np.ndarray) else image.float()
        return scaled if self.float_input_max == 255.0 else scaled * (255.0 / self.float_input_max)

    def _target_size(self, height: int, width: int) -> Tuple[int, int]:
        return shortest_edge_size(height, width, self.min_size, self.max_size)

    def _resized(self, image: np.ndarray) -> np.ndarray:
        size = self._target_size(*image.shape[:2])
        if image.dtype == np.uint8:
            return resize_image(image, size)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return self._resized_tensor(tensor).numpy().transpose(1, 2, 0)

    def _resized_tensor(self, image: torch.Tensor) -> torch.Tensor:
        size = self._target_size(*image.shape[-2:])
        if tuple(size) == tuple(image.shape[-2:]):
            return image
        if image.dtype == torch.uint8:
            resized = resize_image(image.permute(1, 2, 0).cpu().numpy(), size)
            return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]

    def _run_batch(self, images: List[torch.Tensor], output_sizes: List[Tuple[int, int]]) -> List[Detections]:
        normalised = [(image - self.pixel_mean) / self.pixel_std for image in images]
        batch, sizes = pad_images(normalised, self.size_divisibility)
        limit = self.max_image_size
        if limit is not None and max(batch.shape[-2:]) > limit:
            raise ValueError(
                f"Predictor: a padded batch of {tuple(batch.shape[-2:])} exceeds the exported model's largest size "
                f"{limit}; set a smaller max_size or export with a larger --max-image-size"
            )
        divisor = max(self.size_divisibility, 1)
        small = -(-self.min_padded_size // divisor) * divisor
        if min(batch.shape[-2:]) < small:
            # NOTE: an exported model takes batches from MIN_IMAGE_SIZE pixels on; a smaller
            # image is padded further (as in a batch with a larger image), which changes its
            # predictions slightly against the eager model on the smaller padding.
            grow = [0, max(small - batch.shape[-1], 0), 0, max(small - batch.shape[-2], 0)]
            batch = F.pad(batch, grow)
        image_sizes = torch.tensor(sizes, dtype=torch.long)  # on the host: the model moves them
        found = self.postprocess(
            self.backend(batch, image_sizes),
            sizes,
            tuple(batch.shape[-2:]),
            output_sizes,
            self.score_threshold,
            self.max_detections,
        )
        if self.class_mask is None:
            return found
        return [thing_detections(f, self.class_mask) for f in found]

    def __call__(self, images: Sequence[ImageInput]) -> list:
        """Instances (or Detections) of every image, at its original size."""
        if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
            raise TypeError("Predictor: give a list of images (wrap a single image in a list)")
        images = list(images)
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared = [self._prepare(image, start + i) for i, image in enumerate(chunk)]
            tensors, originals = [p[0] for p in prepared], [p[1] for p in prepared]
            detections = self._run_batch(tensors, originals)
            results += [self._output(d, size) for d, size in zip(detections, originals)]
        return results

    def _output(self, found: Detections, size: Tuple[int, int]):
        return found if self.convert is None else self.convert(found, size)

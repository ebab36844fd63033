"""What a deployed model needs besides its graph: the input convention and the inference
settings, stored inside every exported file (`torch.export` archive, AOTInductor package,
ONNX model) so that `ExportedDetector` and `Predictor` can use it without the repository's
configuration."""

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

__all__ = ["ExportMetadata", "METADATA_KEY", "MIN_IMAGE_SIZE"]

METADATA_KEY = "di_maskdino"
FORMAT_VERSION = 2
MIN_IMAGE_SIZE = 128  # smallest padded height / width of an export: every level (down to stride 64) at least 2 x 2


@dataclass
class ExportMetadata:
    """
    pixel_mean, pixel_std: per-channel normalisation, in the channel order of `input_format`.
    size_divisibility: the padded batch's height and width are multiples of it.
    input_format: channel order the network expects ("RGB" or "BGR").
    min_size, max_size: shortest-edge resizing before the network (detectron2's
        INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST); 0 = no resizing.
    num_classes, test_topk: classes and (query, class) pairs per image of the outputs.
    masks: whether the outputs include mask logits (False: detection only).
    deformable_attention: how the deformable attention is expressed in the graph: "kernel"
        (our operator, torch.ops.di_maskdino.ms_deform_attn_forward), "decomposed" (standard
        operators) or "trt_plugin" (a MultiscaleDeformableAttnPlugin_TRT node).
    max_image_size: the largest padded height and width the dynamic shapes allow.
    class_names: optional, for drawing.
    instance_classes: the labels reported as instances (the things of a panoptic model,
        whose labels also index stuff), or None: every label.
    padding_mask: the model has a padding mask and takes the image sizes as a second input.
    """

    pixel_mean: Tuple[float, ...]
    pixel_std: Tuple[float, ...]
    size_divisibility: int
    num_classes: int
    test_topk: int
    masks: bool = True
    input_format: str = "RGB"
    min_size: int = 0
    max_size: int = 0
    deformable_attention: str = "kernel"
    max_image_size: int = 4096
    class_names: List[str] = field(default_factory=list)
    instance_classes: Optional[List[int]] = None
    padding_mask: bool = False
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExportMetadata":
        values = json.loads(text)
        version = values.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"exported model metadata has format version {version}; this version of di_maskdino reads "
                f"{FORMAT_VERSION}: export the model again with tools/export_model.py"
            )
        values["pixel_mean"] = tuple(values["pixel_mean"])
        values["pixel_std"] = tuple(values["pixel_std"])
        return cls(**values)

"""Export of the inference model: `torch.export`, AOTInductor and ONNX.

What is exported is `DIMaskDINO.detect` on a preprocessed batch (normalised, padded to a
multiple of the size divisibility): images (B, 3, H, W) float32 in; per image the
`test_topk` best (query, class) pairs out - scores (B, k) class probabilities, labels (B, k)
int64, boxes (B, k, 4) normalised (cx, cy, w, h) of the padded input and, unless the model
is detection-only, mask_logits (B, k, H/4, W/4). Resizing the masks to the original image,
the mask score and the box scaling stay in Python (`postprocess.detections_from_raw`),
shared by the eager and the exported models. Batch, height and width are dynamic (height
and width multiples of the size divisibility).

The deformable attention is our custom operator in the `torch.export` program and (by
default) in the AOTInductor package, so those need the compiled operator library
(`di_maskdino/_C*.so`, loadable with `torch.ops.load_library`) but no model code. For ONNX it
is decomposed into gathers (`ops.ms_deform_attn_gather`), or written as one
MultiscaleDeformableAttnPlugin_TRT node for TensorRT.
"""

import math
import os
from typing import Optional, Sequence

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from ..modeling.model import DIMaskDINO
from ..ops.decomposed import ms_deform_attn_gather
from .metadata import METADATA_KEY, MIN_IMAGE_SIZE, ExportMetadata

__all__ = [
    "DetectorGraph",
    "example_inputs",
    "OUTPUT_NAMES",
    "metadata_for",
    "example_batch",
    "export_program",
    "decompose_deformable_attention",
    "save_program",
    "compile_aoti",
    "export_onnx",
    "DEFORMABLE_ATTENTION_MODES",
    "TRT_PLUGIN",
    "TRT_DOMAIN",
]

OUTPUT_NAMES = ("scores", "labels", "boxes", "mask_logits")
DEFORMABLE_ATTENTION_MODES = ("kernel", "decomposed", "trt_plugin")
MAX_BATCH = 64


class DetectorGraph(nn.Module):
    """`DIMaskDINO.detect` with tensors in and a tuple of tensors out, as export captures it.
    A model with a padding mask takes a second input, image_sizes (B, 2) int64: each image's
    (h, w) before padding."""

    def __init__(self, model: DIMaskDINO):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, image_sizes: Optional[torch.Tensor] = None):
        return self.model.detect(images, image_sizes).as_tuple()


def example_inputs(model: DIMaskDINO, images: torch.Tensor):
    """The inputs of `DetectorGraph` for a preprocessed batch: the images, and for a model
    with a padding mask image sizes (made distinct from the batch's, so that they stay
    inputs rather than constants)."""
    if not model.padding_mask:
        return (images,)
    height, width = images.shape[-2:]
    sizes = torch.tensor([[height - 8 * i, width - 16 * i] for i in range(images.shape[0])], dtype=torch.long)
    return images, sizes.clamp(min=1)


def metadata_for(
    model: DIMaskDINO,
    *,
    input_format: str = "RGB",
    min_size: int = 0,
    max_size: int = 0,
    class_names: Sequence[str] = (),
    deformable_attention: str = "kernel",
    max_image_size: int = 4096,
) -> ExportMetadata:
    """The metadata stored with an export of `model`: with panoptic / semantic inference over
    things and stuff (`model.segmentation`), the thing classes as the instance classes. An
    export holds the detector's inference, so a model whose box mask head refines the test
    masks is refused."""
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")
    if model.reports_refined_masks:
        raise ValueError(
            "the export holds the detector's inference (its own masks), but this model's box mask head refines the "
            "masks it reports: export it with MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS detector, or run the refined "
            "masks in PyTorch (Predictor.from_config, tools/demo.py)"
        )
    class_mask = model.instance_class_mask()
    instance_classes = None if class_mask is None else class_mask.nonzero()[:, 0].tolist()
    return ExportMetadata(
        pixel_mean=tuple(float(v) for v in model.pixel_mean.flatten()),
        pixel_std=tuple(float(v) for v in model.pixel_std.flatten()),
        size_divisibility=model.size_divisibility,
        num_classes=model.head.heads.num_classes,
        test_topk=model.test_topk,
        masks=model.predicts_masks,
        input_format=input_format,
        min_size=min_size,
        max_size=max_size,
        deformable_attention=deformable_attention,
        max_image_size=max_image_size,
        class_names=list(class_names),
        instance_classes=instance_classes,
        padding_mask=model.padding_mask,
    )


def _divisibility(model: DIMaskDINO) -> int:
    return max(model.size_divisibility, 1)


def example_batch(model: DIMaskDINO) -> torch.Tensor:
    """A preprocessed batch of two images of different sizes, the example export traces
    with (distinct sizes keep batch, height and width from being taken as one symbol)."""
    divisor = _divisibility(model)
    blocks = max(math.ceil(MIN_IMAGE_SIZE / divisor), 2)
    height, width = divisor * (blocks + 2), divisor * (blocks + 4)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator) * 255, torch.rand(3, height - 8, width - 24) * 255]
    return model.preprocess(images)[0]


def _dynamic_shapes(model: DIMaskDINO, max_image_size: int):
    divisor = _divisibility(model)
    low = max(math.ceil(MIN_IMAGE_SIZE / divisor), 2)
    high = max_image_size // divisor
    if high < low:
        raise ValueError(f"max_image_size {max_image_size} is below the smallest exportable size {low * divisor}")
    if divisor > 1:
        height = divisor * Dim("height_blocks", min=low, max=high)
        width = divisor * Dim("width_blocks", min=low, max=high)
    else:
        height = Dim("height", min=low, max=high)
        width = Dim("width", min=low, max=high)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    shapes = {"images": {0: batch, 2: height, 3: width}}
    if model.padding_mask:
        shapes["image_sizes"] = {0: batch}
    return shapes


def size_oblivious_tracing():
    """A context in which tracing takes decisions that depend on a size being 1 (e.g. whether
    a reshape of a transposed (B, S, C) tensor can be a view) as for the general size, instead
    of guarding the exported program to batches other than 1.

    NOTE: torch (2.14) has no public switch for this; it is the private
    `torch.fx.experimental._config.backed_size_oblivious`, used here only.
    tests/export/test_exporters.py fails loudly if torch drops or renames it."""
    import torch.fx.experimental._config as fx_config

    if not hasattr(fx_config, "backed_size_oblivious"):
        raise RuntimeError(
            "this torch has no torch.fx.experimental._config.backed_size_oblivious, which the export relies on; "
            "use the torch version of requirements.txt"
        )
    return fx_config.patch(backed_size_oblivious=True)


def export_program(
    model: DIMaskDINO, *, max_image_size: int = 4096, example: Optional[torch.Tensor] = None
) -> ExportedProgram:
    """`torch.export` of `model.detect` with dynamic batch, height and width (multiples of
    the size divisibility, from 128 to `max_image_size` pixels)."""
    if model.training:
        raise ValueError("export_program: put the model in evaluation mode first (model.eval())")
    for module in model.modules():  # a part that would fix the input size (e.g. TimmViT with rotary embeddings)
        problem = getattr(module, "export_size_problem", None)
        if problem:
            raise ValueError(f"export_program: the program's height and width must stay dynamic, but {problem}")
    example = example_batch(model) if example is None else example
    with torch.no_grad(), size_oblivious_tracing():
        return torch.export.export(
            DetectorGraph(model),
            example_inputs(model, example),
            dynamic_shapes=_dynamic_shapes(model, max_image_size),
            strict=False,
        )


def decompose_deformable_attention(program: ExportedProgram) -> ExportedProgram:
    """The program with every call of our deformable-attention operator replaced by
    standard operators (`ms_deform_attn_gather`)."""
    return program.run_decompositions({torch.ops.di_maskdino.ms_deform_attn_forward.default: ms_deform_attn_gather})


def save_program(program: ExportedProgram, path: str, metadata: ExportMetadata) -> str:
    """Writes a `torch.export` archive (load with `torch.export.load`) with the metadata."""
    torch.export.save(program, path, extra_files={METADATA_KEY: metadata.to_json()})
    return path


def compile_aoti(program: ExportedProgram, path: str, metadata: ExportMetadata) -> str:
    """Compiles an AOTInductor package (load with `torch._inductor.aoti_load_package`; the
    metadata is its `get_metadata()[METADATA_KEY]`)."""
    options = {"aot_inductor.metadata": {METADATA_KEY: metadata.to_json()}}
    return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path), inductor_configs=options)


TRT_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
TRT_DOMAIN = "trt"


def _register_trt_plugin_schema() -> None:
    """Declares TensorRT's plugin node to onnx (once), so that onnxscript can write it:
    inputs value (N, S, M, D), spatial_shapes (L, 2) int32, level_start_index (L,) int32,
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); one output;
    no attributes."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema(TRT_PLUGIN, 1, TRT_DOMAIN)
        return  # registered before
    except onnx.defs.SchemaError:
        pass
    parameter = OpSchema.FormalParameter
    schema = OpSchema(
        TRT_PLUGIN,
        TRT_DOMAIN,
        1,
        inputs=[
            parameter("value", "T"),
            parameter("spatial_shapes", "I"),
            parameter("level_start_index", "I"),
            parameter("sampling_locations", "T"),
            parameter("attention_weights", "T"),
        ],
        outputs=[parameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
    )
    onnx.defs.register_schema(schema)


def _trt_plugin_translation():
    """onnxscript translation of our operator into TensorRT's MultiscaleDeformableAttnPlugin_TRT
    (inputs value, int32 spatial_shapes, int32 level_start_index, sampling_locations,
    attention_weights; output (B, Q, heads, C_h), reshaped to our (B, Q, heads * C_h))."""
    import onnxscript
    from onnxscript import opset18 as op

    _register_trt_plugin_schema()
    trt = onnxscript.values.Opset(TRT_DOMAIN, 1)

    def ms_deform_attn_trt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        output = getattr(trt, TRT_PLUGIN)(
            value,
            op.Cast(spatial_shapes, to=onnxscript.INT32.dtype),
            op.Cast(level_start_index, to=onnxscript.INT32.dtype),
            sampling_locations,
            attention_weights,
        )
        return op.Reshape(output, op.Constant(value_ints=[0, 0, -1]))

    return {torch.ops.di_maskdino.ms_deform_attn_forward.default: ms_deform_attn_trt}


def export_onnx(
    program: ExportedProgram,
    path: str,
    metadata: ExportMetadata,
    *,
    trt_plugin: bool = False,
    opset: int = 18,
    optimize: bool = False,
) -> str:
    """ONNX model of an exported program (from `export_program`, with the kernel operator):
    the deformable attention decomposed into standard operators, or with `trt_plugin` one
    MultiscaleDeformableAttnPlugin_TRT node (domain "trt") per call. Inputs "images", outputs
    OUTPUT_NAMES; the metadata is in the model's metadata_props[METADATA_KEY].

    NOTE: after this, `program` cannot be traced again - a second ONNX export or an
    AOTInductor compilation of it fails (torch 2.14: PendingUnbackedSymbolNotFound, also with
    a deep copy). Give every ONNX export a program of its own (`export_program`) and compile
    AOTInductor packages before (tools/export_model.py and dev/benchmark_model.py do).

    optimize: run onnxscript's graph optimizer on the result. NOTE: off by default - it took
    minutes on the small test model on two CPU cores, and onnxruntime optimizes the graph
    when it loads it anyway (GraphOptimizationLevel.ORT_ENABLE_ALL in `ExportedDetector`)."""
    import onnx

    if opset < 17:
        raise ValueError(f"export_onnx: opset must be 17 or later, got {opset}")
    if trt_plugin:
        table = _trt_plugin_translation()
    else:
        program, table = decompose_deformable_attention(program), None
    outputs = OUTPUT_NAMES if metadata.masks else OUTPUT_NAMES[:3]
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        opset_version=opset,
        input_names=["images", "image_sizes"] if metadata.padding_mask else ["images"],
        output_names=list(outputs),
        custom_translation_table=table,
        optimize=optimize,
        external_data=False,
    )
    onnx_program.save(os.fspath(path), external_data=False)
    model = onnx.load(os.fspath(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: metadata.to_json()})
    onnx.save(model, os.fspath(path))
    return path

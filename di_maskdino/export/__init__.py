"""Deployment of DI-MaskDINO: export of the inference model (`torch.export`, AOTInductor,
ONNX) and the runtime that runs the exported files (`ExportedDetector`)."""

from .exporters import (
    DEFORMABLE_ATTENTION_MODES,
    OUTPUT_NAMES,
    TRT_DOMAIN,
    TRT_PLUGIN,
    DetectorGraph,
    compile_aoti,
    decompose_deformable_attention,
    example_batch,
    export_onnx,
    export_program,
    metadata_for,
    save_program,
)
from .metadata import METADATA_KEY, ExportMetadata
from .runtime import ExportedDetector, exported_kind, load_operator_library

__all__ = [
    "DetectorGraph",
    "OUTPUT_NAMES",
    "DEFORMABLE_ATTENTION_MODES",
    "TRT_PLUGIN",
    "TRT_DOMAIN",
    "metadata_for",
    "example_batch",
    "export_program",
    "decompose_deformable_attention",
    "save_program",
    "compile_aoti",
    "export_onnx",
    "ExportMetadata",
    "METADATA_KEY",
    "ExportedDetector",
    "exported_kind",
    "load_operator_library",
]

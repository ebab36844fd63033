"""Running an exported DI-MaskDINO: a `torch.export` archive, an AOTInductor package or an
ONNX model (onnxruntime), behind one interface - preprocessed batch in, `RawDetections` out.

Only torch (and onnxruntime for ONNX) is needed: the model code of this repository is not
imported. A graph that calls our deformable-attention operator needs its library loaded
first; `ExportedDetector` loads `di_maskdino/_C*.so` when it is present (or the library
named by `operator_library`).
"""

import glob
import os
import zipfile
from typing import Optional

import torch

from ..modeling.outputs import RawDetections
from .metadata import METADATA_KEY, MIN_IMAGE_SIZE, ExportMetadata

__all__ = ["ExportedDetector", "exported_kind", "load_operator_library"]

KINDS = ("export", "aoti", "onnx")


def exported_kind(path: str) -> str:
    """ "onnx", "aoti" (AOTInductor package) or "export" (torch.export archive) by content."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model not found: {path}")
    if not zipfile.is_zipfile(path):
        return "onnx"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/data/aotinductor/" in name or name.startswith("data/aotinductor/") for name in names):
        return "aoti"
    return "export"


def load_operator_library(path: Optional[str] = None) -> None:
    """Registers torch.ops.di_maskdino.* from the compiled library (default: the one next
    to this package), unless already registered."""
    if hasattr(torch.ops.di_maskdino, "ms_deform_attn_forward"):
        return
    if path is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
        if not found:
            raise RuntimeError(
                "this exported model calls the di_maskdino deformable-attention operator, but its library "
                "(di_maskdino/_C*.so) is not built: build it (`pip install --no-build-isolation -e .`), pass "
                "operator_library=PATH, or export with --deformable-attention decomposed"
            )
        path = found[0]
    torch.ops.load_library(path)


class ExportedDetector:
    """An exported model as a function of a preprocessed batch.

    Args:
        path: a .pt2 archive of `torch.export`, an AOTInductor package, or a .onnx model.
        device: where the torch backends run (the AOTInductor package runs on the device it
            was compiled for).
        operator_library: path of the compiled operator library, when the graph needs it and
            it is not the one next to this package.
        onnx_threads: intra-op threads of onnxruntime (default: its own choice).
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        operator_library: Optional[str] = None,
        onnx_threads: Optional[int] = None,
    ):
        self.path = os.fspath(path)
        self.kind = exported_kind(self.path)
        self.device = torch.device(device)
        if self.kind == "onnx":
            self._load_onnx(onnx_threads)
        else:
            metadata = self._read_torch_metadata()
            if metadata.deformable_attention == "kernel":
                load_operator_library(operator_library)
            if self.kind == "export":
                extra = {METADATA_KEY: ""}
                program = torch.export.load(self.path, extra_files=extra)
                self._run = program.module().to(self.device)
            else:
                self._run = torch._inductor.aoti_load_package(self.path)
            self.metadata = metadata

    def _read_torch_metadata(self) -> ExportMetadata:
        with zipfile.ZipFile(self.path) as archive:
            for name in archive.namelist():
                if self.kind == "export" and name.endswith(f"extra/{METADATA_KEY}"):
                    return ExportMetadata.from_json(archive.read(name).decode())
                if self.kind == "aoti" and name.endswith("metadata.json") and "aotinductor" in name:
                    import json

                    values = json.loads(archive.read(name).decode())
                    if METADATA_KEY in values:
                        return ExportMetadata.from_json(values[METADATA_KEY])
        raise ValueError(f"{self.path} holds no di_maskdino metadata: export it with tools/export_model.py")

    def _load_onnx(self, threads: Optional[int]) -> None:
        try:
            import onnx
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "running an ONNX model needs onnx and onnxruntime: pip install onnx onnxruntime "
                "(listed in requirements.txt)"
            ) from error
        model = onnx.load(self.path, load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise ValueError(f"{self.path} holds no di_maskdino metadata: export it with tools/export_model.py")
        self.metadata = ExportMetadata.from_json(props[METADATA_KEY])
        if self.metadata.deformable_attention == "trt_plugin":
            raise ValueError(
                f"{self.path} holds MultiscaleDeformableAttnPlugin_TRT nodes, which only TensorRT runs; export with "
                "the decomposed deformable attention for onnxruntime"
            )
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> RawDetections:
        """images: (B, 3, H, W) preprocessed batch (normalised, padded to a multiple of the
        size divisibility); image_sizes: (B, 2) int64 (h, w) of the images before padding,
        needed by a model exported with a padding mask, ignored otherwise."""
        divisor = max(self.metadata.size_divisibility, 1)
        if images.dim() != 4 or images.shape[-2] % divisor or images.shape[-1] % divisor:
            raise ValueError(
                f"ExportedDetector: expected a (B, 3, H, W) batch with H and W multiples of {divisor}, "
                f"got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        limit = self.metadata.max_image_size
        if min(height, width) < MIN_IMAGE_SIZE or max(height, width) > limit:
            raise ValueError(
                f"ExportedDetector: the exported model takes padded batches from {MIN_IMAGE_SIZE} to {limit} pixels "
                f"high and wide, got {height} x {width}: pad small images further, or export with a larger "
                "--max-image-size for large ones"
            )
        inputs = [images.to(self.device, torch.float32)]
        if self.metadata.padding_mask:
            if image_sizes is None:
                raise ValueError(
                    "ExportedDetector: this model was exported with a padding mask and needs image_sizes, the (h, w) "
                    "of every image before padding (the Predictor passes them)"
                )
            if tuple(image_sizes.shape) != (images.shape[0], 2):
                raise ValueError(
                    f"ExportedDetector: image_sizes must be ({images.shape[0]}, 2) (h, w per image), "
                    f"got {tuple(image_sizes.shape)}"
                )
            inputs.append(image_sizes.to(self.device, torch.long))
        if self.kind == "onnx":
            feeds = {i.name: x.detach().cpu().contiguous().numpy() for i, x in zip(self._session.get_inputs(), inputs)}
            outputs = self._session.run(None, feeds)
            return RawDetections.from_tuple(torch.from_numpy(o) for o in outputs)
        with torch.no_grad():
            return RawDetections.from_tuple(self._run(*inputs))

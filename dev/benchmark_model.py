#!/usr/bin/env python
"""Size and speed of a DI-MaskDINO configuration (the paper's Params / FLOPs / FPS columns),
on the eager model or a compiled / exported one.

    python dev/benchmark_model.py --config-file configs/coco/dimaskdino_r50_12ep.yaml \\
        --input-size 800x1333 --device cuda
    python dev/benchmark_model.py --config-file configs/quick_start.yaml --input-size 128x128 \\
        --backend eager compile export aoti onnxruntime --export-dir output/export_quick --no-flops

Reports parameters (total and per part), FLOPs (fvcore's counter with handles for the
deformable attention op and scaled-dot-product attention; one fused multiply-add = one
flop), peak memory of one eager forward (CUDA: max allocated; CPU: growth of the process's
resident-set high-water mark), and per backend the median over --repeats runs, after
--warmup runs, of
  model time   the inference network on a preprocessed batch (what the paper's FPS counts):
               backbone, encoder, head, top-k pairs and their masks at 1/4 resolution
  end to end   normalisation and padding + model + post-processing to instances at the
               input size (masks resized, mask scores, boxes)
Backends: eager (PyTorch), compile (torch.compile, Inductor with frozen weights), export
(the torch.export program), aoti (AOTInductor package), onnxruntime (the ONNX model on the
CPU). Exported files are written to (or, when present, read from) --export-dir. On the CPU,
eager and compile run as the tools run them: with the CPU speed-ups of TEST.CPU_SPEEDUPS (on
unless TEST.CPU_SPEEDUPS False is given), 3x3 convolutions by NNPACK's Winograd transform
(`di_maskdino.cpu_inference.winograd`).
--dtype bfloat16 runs eager / compile under bfloat16 autocast (the deformable attention,
encoder and decoder stay in float32, as in training). Random input, random weights unless
MODEL.WEIGHTS is given.

On the CPU, each model-time reading also gives the minor page faults per run, and
--retain-freed-memory makes malloc keep freed memory for reuse (`di_maskdino.cpu_inference.memory`): without
it, every forward pass at detection resolution faults its large activations in anew.
--versus 'KEY VALUE ...' builds a second model with these overrides on top (the same weights)
and times the two run by run, alternating which goes first, for eager and compile: both
medians and the median of the per-run ratio, second / first (what changes with a switch,
such as MODEL.DI_MASKDINO.PADDING_MASK, on a machine whose speed drifts between processes).
--breakdown profiles one eager (and compile) forward and splits its CPU time into matrix
products (convolutions, GEMMs, attention), the deformable attention and everything else: a
backend that keeps float32 and the same matrix kernels cannot take less than the matrix
products' time.
"""

import argparse
import contextlib
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time

import torch

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis

from di_maskdino.cpu_inference import retain_freed_memory, winograd
from di_maskdino.cpu_inference.profiling import MATRIX_FLOP_OPERATORS, time_by_kind
from di_maskdino.d2 import Checkpointer, CheckpointError, ConfigArgumentParser, load_config
from di_maskdino.d2.engine import TOOL_DEFAULTS
from di_maskdino.ops import flop_handles
from di_maskdino.predictor import Predictor

BACKENDS = ("eager", "compile", "export", "aoti", "onnxruntime")
EXPORTED_FILES = {"export": "model.pt2", "aoti": "model_aoti.pt2", "onnxruntime": "model.onnx"}


class FinalPrediction(torch.nn.Module):
    """The network on a preprocessed batch, returning tensors (for jit tracing)."""

    def __init__(self, model, image_sizes):
        super().__init__()
        self.model = model
        self.image_sizes = image_sizes

    def forward(self, batch):
        return self.model.detect(batch, self.image_sizes).as_tuple()


def count_flops(model, batch, image_sizes):
    handles = {**flop_handles(), winograd.WINOGRAD_OP: winograd.winograd_conv_flop_jit}
    analysis = FlopCountAnalysis(FinalPrediction(model, image_sizes), (batch,)).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total(), analysis.by_operator(), analysis.unsupported_ops()


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def seconds(function, device) -> float:
    """Wall time of one `function()`, its CUDA work included."""
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed(function, device, warmup, repeats):
    """(median seconds, every run's seconds, minor page faults per run) of `function()`."""
    for _ in range(warmup):
        seconds(function, device)
    faults = page_faults()
    times = [seconds(function, device) for _ in range(repeats)]
    return statistics.median(times), times, (page_faults() - faults) / max(repeats, 1)


def timed_pair(first, second, device, warmup, repeats):
    """`timed` of two functions run by run, the order alternating: (median seconds of each,
    median of the per-run ratios second / first, every run's (first, second) seconds)."""
    for _ in range(warmup):
        seconds(first, device), seconds(second, device)
    runs = []
    for index in range(repeats):
        if index % 2 == 0:
            a, b = seconds(first, device), seconds(second, device)
        else:
            b, a = seconds(second, device), seconds(first, device)
        runs.append((a, b))
    ratio = statistics.median(b / a for a, b in runs)
    return statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs), ratio, runs


def print_breakdown(kind, function, batch, model_time, matrix_flops):
    """One profiled forward of `function`, its CPU time by kind of operator, and the floor
    that its matrix products set."""
    with torch.inference_mode():
        kinds = time_by_kind(function, batch)
    profiled = sum(kinds.values())
    print(f"  {kind} CPU time by kind of operator (one profiled forward, {profiled * 1e3:.0f} ms):")
    for name, seconds in kinds.items():
        print(f"    {name}: {seconds * 1e3:.0f} ms ({100 * seconds / profiled:.0f}%)")
    share = kinds["matrix products"] / profiled
    print(
        f"    matrix products: about {share * model_time * 1e3:.0f} ms of the {model_time * 1e3:.0f} ms model time, "
        "the least a float32 backend running them with the same kernels can take"
    )
    if matrix_flops:
        # fvcore's FLOPs are multiply-adds; a GEMM benchmark's GFLOP/s counts two per multiply-add
        rate = matrix_flops / kinds["matrix products"] / 1e9
        print(
            f"    matrix products ran at {rate:.1f} G multiply-adds per second (fvcore's count, of direct "
            "convolutions: Winograd ones do fewer)"
        )


def peak_memory(model, batch, image_sizes, device):
    """Memory of one eager forward (MiB): CUDA max allocated, or CPU resident-set growth."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        model.detect(batch, image_sizes)
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, "CPU resident set growth"


def exported_file(kind, model, cfg, export_dir):
    """The exported file of `kind` in export_dir, exported now if absent."""
    from di_maskdino.export import compile_aoti, export_onnx, export_program, metadata_for, save_program

    path = os.path.join(export_dir, EXPORTED_FILES[kind])
    if os.path.exists(path):
        print(f"  using {path}")
        return path
    os.makedirs(export_dir, exist_ok=True)
    start = time.perf_counter()
    mode = "decomposed" if kind == "onnxruntime" else "kernel"
    metadata = metadata_for(model, input_format=cfg.INPUT.FORMAT, deformable_attention=mode)
    program = export_program(model)
    if kind == "export":
        save_program(program, path, metadata)
    elif kind == "aoti":
        compile_aoti(program, path, metadata)
    else:
        export_onnx(program, path, metadata)
    print(f"  exported {path} in {time.perf_counter() - start:.0f} s")
    return path


def backend_function(kind, model, cfg, args):
    """(preprocessed batch, image sizes) -> RawDetections for `kind`."""
    if kind == "eager":
        return model.detect
    if kind == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant weights: folded and prepacked for the CPU kernels
        return torch.compile(model.detect, dynamic=False)
    from di_maskdino.export import ExportedDetector

    directory = args.export_dir or tempfile.mkdtemp(prefix="dimaskdino_export_")
    return ExportedDetector(exported_file(kind, model, cfg, directory), device=args.device)


def main() -> int:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input-size", default="800x1333", help="HxW of the (single) input image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", nargs="+", default=["eager"], choices=BACKENDS)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--export-dir", help="folder of exported files (written when absent)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it traces the model once)")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="CPU: malloc keeps freed memory (di_maskdino.cpu_inference.memory)",
    )
    parser.add_argument(
        "--versus",
        metavar="'KEY VALUE ...'",
        help="eager / compile: time a second model with these config overrides against the first, run by run",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="CPU: eager / compile time by kind of operator (di_maskdino.cpu_inference.profiling)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "bfloat16" and set(args.backend) - {"eager", "compile"}:
        parser.error("--dtype bfloat16 is measured for the eager and compile backends")
    if args.versus and set(args.backend) - {"eager", "compile"}:
        parser.error("--versus times the eager and compile backends")
    if args.breakdown and (not args.device.startswith("cpu") or args.dtype != "float32"):
        parser.error("--breakdown profiles float32 forwards on the CPU (--device cpu, --dtype float32)")
    if args.breakdown:
        # Kineto, the profiler's backend, logs its stages and, without a GPU, an "ERROR" about the
        # device count; level 6 keeps it quiet (a user's own setting wins)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if args.retain_freed_memory:
        applied = retain_freed_memory()
        refused = "--retain-freed-memory: not applied (the C library is not glibc, or it refused)"
        print("freed memory is retained (glibc malloc)" if applied else refused)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; benchmark with --device cpu")
    cfg = load_config(args.config_file, list(TOOL_DEFAULTS) + args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    device = torch.device(args.device)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        try:
            Checkpointer(model, mode="strict", what="MODEL.WEIGHTS").load(cfg.MODEL.WEIGHTS)
        except CheckpointError as error:
            raise SystemExit(str(error)) from error
    other = None
    if args.versus:
        other_cfg = load_config(args.config_file, list(TOOL_DEFAULTS) + args.opts + shlex.split(args.versus))
        other_cfg.MODEL.DEVICE = args.device
        other_cfg.freeze()
        other = build_model(other_cfg).eval()
        try:
            other.load_state_dict(model.state_dict())
        except RuntimeError as error:
            raise SystemExit(
                f"--versus {args.versus!r} changes the model's parameters; compare switches that keep them: {error}"
            ) from error
    height, width = (int(v) for v in args.input_size.split("x"))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("backbone", "encoder", "head")
    }
    total = sum(p.numel() for p in model.parameters())
    print(
        f"config {args.config_file}, input {height}x{width}, device {device}, {torch.get_num_threads()} threads, "
        f"dtype {args.dtype}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"parameters: {total / 1e6:.2f} M (" + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parts.items()) + ")")

    batch, sizes = model.preprocess([image])
    image_sizes = torch.tensor(sizes, dtype=torch.long, device=batch.device)  # read with a padding mask
    # eager and compile run in the context CPU inference runs in; exports are made without it
    speedups = model.cpu_inference
    winograd_on = args.dtype == "float32" and speedups is not None and speedups.runs_winograd(batch.shape, device)
    if device.type == "cpu":
        if winograd_on:
            algorithm = (
                f"Winograd (NNPACK) where >= {winograd.MIN_CHANNELS} channels in and out and "
                f">= {winograd.MIN_OUTPUT_PIXELS} output pixels per image"
            )
        elif speedups is None or not speedups.winograd:
            algorithm = "direct (oneDNN; TEST.CPU_SPEEDUPS False)"
        elif not winograd.winograd_available():
            algorithm = "direct (oneDNN; NNPACK is not available here)"
        else:
            algorithm = "direct (oneDNN; the input is too small or not float32 for Winograd to pay)"
        print(f"3x3 stride-1 convolutions of eager / compile: {algorithm}")
    peak, measured = peak_memory(model, batch, image_sizes, device)  # first: a later forward would set the mark
    print(f"peak memory of one eager forward: {peak:.0f} MiB ({measured})")
    matrix_flops = None
    if not args.no_flops:
        with torch.no_grad():
            flops, by_operator, unsupported = count_flops(model, batch, image_sizes)
        matrix_flops = sum(by_operator.get(name, 0) for name in MATRIX_FLOP_OPERATORS)
        top = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in sorted(by_operator.items(), key=lambda kv: -kv[1])[:6])
        print(f"FLOPs: {flops / 1e9:.1f} G  ({top}; G)")
        calls, kinds = sum(unsupported.values()), len(unsupported)
        print(f"  not counted (elementwise and indexing ops): {calls} calls of {kinds} kinds")

    # in BACKENDS order whatever the command line's: AOTInductor before ONNX (see export_onnx)
    for kind in [k for k in BACKENDS if k in args.backend]:
        print(f"{kind}:")
        function = backend_function(kind, model, cfg, args)
        predictor = Predictor(
            function,
            pixel_mean=model.pixel_mean.flatten().tolist(),
            pixel_std=model.pixel_std.flatten().tolist(),
            size_divisibility=model.size_divisibility,
            device=device,
            max_detections=None,
        )
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
        )
        in_model_code = kind in ("eager", "compile")
        convolutions = winograd.winograd_convolutions(winograd_on and in_model_code)
        with torch.inference_mode(), autocast, convolutions:
            model_time, runs, faults = timed(
                lambda f=function: f(batch, image_sizes), device, args.warmup, args.repeats
            )
            end_to_end, _, _ = timed(lambda p=predictor: p([image]), device, args.warmup, args.repeats)
            if other is not None:
                second = backend_function(kind, other, other_cfg, args)
                first_time, second_time, ratio, pairs = timed_pair(
                    lambda f=function: f(batch, image_sizes),
                    lambda f=second: f(batch, image_sizes),
                    device,
                    args.warmup,
                    args.repeats,
                )
            print(
                f"  model time: {model_time * 1e3:.1f} ms ({1 / model_time:.2f} FPS; runs "
                + ", ".join(f"{t * 1e3:.0f}" for t in runs)
                + " ms)"
                + (f"; {faults:.0f} page faults per run" if device.type == "cpu" else "")
            )
            print(f"  end to end with post-processing: {end_to_end * 1e3:.1f} ms")
            if other is not None:
                print(
                    f"  versus {args.versus}, run by run: model time {first_time * 1e3:.1f} ms against "
                    f"{second_time * 1e3:.1f} ms; ratio (second / first) median {ratio:.3f} over {len(pairs)} runs"
                )
            if args.breakdown and kind in ("eager", "compile"):
                print_breakdown(kind, lambda b, f=function: f(b, image_sizes), batch, model_time, matrix_flops)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time, memory and host-device synchronisations of one training step: this project's step
alone, or side by side with the authors' release on the same configuration, weights and
batches.

    # this project's step on one of its configs
    python dev/benchmark_training.py --config-file configs/quick_start.yaml --batch 4 --input-size 128x128

    # against the release (a local checkout; needs detectron2), on a release config
    python dev/benchmark_training.py --release-source /path/to/DI-MaskDINO \\
        --release-config configs/dimaskdino_r50_4scale_bs16_12ep.yaml --batch 1 --input-size 1024x1024
    # ... or on a small model (--small: R18, hidden 256, 3 + 3 layers, 50 queries)
    python dev/benchmark_training.py --release-source /path/to/DI-MaskDINO \\
        --release-config configs/dimaskdino_r50_4scale_bs16_12ep.yaml --small --batch 4 --input-size 256x256

The step is each side's own: this project's `TrainStep` (di_maskdino.d2.engine) on
`DIMaskDINOArch`, the release's meta-architecture in detectron2's `SimpleTrainer` (what the
release's train_net.py runs, without mixed precision). With --release-source, both models
are built from the release config (ours as dev/compare_with_release.py builds it) and ours
gets the release's weights, converted; both step with the same optimizer (AdamW, learning
rate 1e-4, weight decay 0.05, the whole model's gradient norm clipped to 0.01) on the same
batch: --batch random images of --input-size with --objects elliptical instances each. The
two steps alternate in one process (ours, release, ours, ...), after --warmup steps each.

Reported per side:

- step time: median wall clock and process CPU time over --steps steps;
- its split: forward (the model's call without its criterion), matcher (the Hungarian
  matching of every output), losses (the criterion without the matcher), optimizer (the
  clipping and the step), and "backward and the rest" (backward, metric logging, zero_grad);
- peak memory: the largest amount of tensor memory allocated during one step above what
  was allocated before it (PyTorch's CPU allocator, under torch.profiler with
  profile_memory; the CPU counterpart of `torch.cuda.max_memory_allocated` minus the
  memory at the start);
- host-device synchronisations of one step, by place, counted by
  `di_maskdino.host_syncs.SyncCounter` (what a GPU run would wait for; on the release's
  side, its `.cuda()` calls count as moves to the device).

--json writes everything. The release runs on the CPU as in dev/compare_with_release.py
(its CUDA extension replaced by an empty module, `.cuda()` a move to the CPU).
"""

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from di_maskdino.host_syncs import SyncCounter

# a small model in the release's configuration keys (the release cannot express the quick
# start: its token interaction needs a hidden size of 256 and its decoder layers 8 heads)
SMALL_RELEASE_OPTS = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
    "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "1024",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "3",
    "MODEL.MaskDINO.DIM_FEEDFORWARD", "1024",
    "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "50",
    "MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "100",
    "MODEL.MaskDINO.TI_LAYERS", "1",
    "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "10",
    "MODEL.MaskDINO.DEC_LAYERS", "3",
    "MODEL.MaskDINO.DN_NUM", "50",
    "MODEL.MaskDINO.TRAIN_NUM_POINTS", "1024",
    "TEST.DETECTIONS_PER_IMAGE", "50",
]  # fmt: skip
MIB = 2**20
PARTS = ("forward", "matcher", "losses", "backward and the rest", "optimizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", help="this project's config (without --release-source)")
    parser.add_argument("--release-source", help="checkout of the DI-MaskDINO or MaskDINO release")
    parser.add_argument("--release-config", help="release config, relative to the checkout or absolute")
    parser.add_argument(
        "--small",
        action="store_true",
        help="with --release-source: a small model (R18, hidden 256, 3 encoder and 3 decoder layers, 50 queries, "
        "1 token-interaction layer, 1024 points per mask, 3 classes)",
    )
    parser.add_argument("--release-opts", nargs="*", default=[], help="KEY VALUE pairs for the release config")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--input-size", default="128x128", help="HxW of the images")
    parser.add_argument("--objects", type=int, default=5, help="instances per image")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled step (peak memory)")
    parser.add_argument("--top", type=int, default=12, help="synchronisation places printed per side")
    parser.add_argument(
        "--compile-layers",
        action="store_true",
        help="this project's side: torch.compile each encoder, token-interaction and decoder layer (regional)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs for --config-file")
    args = parser.parse_args(argv)
    if bool(args.config_file) == bool(args.release_source):
        parser.error("give either --config-file (this project alone) or --release-source with --release-config")
    if args.release_source and not args.release_config:
        parser.error("--release-source needs --release-config (a config of the release)")
    if args.small and not args.release_source:
        parser.error("--small describes a release config: use it with --release-source")
    try:
        args.size = tuple(int(v) for v in args.input_size.lower().split("x"))
        assert len(args.size) == 2 and min(args.size) > 0
    except (ValueError, AssertionError):
        parser.error(f"--input-size must be HxW with positive integers, e.g. 128x128; got {args.input_size!r}")
    return args


# ---------------------------------------------------------------------------------------
# the two models


def clipped_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW whose step first clips the whole model's gradient norm to 0.01 (the release's
    COCO setting), the same for both sides."""
    parameters = [p for p in model.parameters() if p.requires_grad]

    class ClippedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_(parameters, 0.01)
            return super().step(closure)

    return ClippedAdamW(parameters, lr=1e-4, weight_decay=0.05)


def ours_alone(args):
    """This project's model and its trainer-side pieces from --config-file."""
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config

    cfg = load_config(args.config_file, args.opts)
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    return model, cfg.MODEL.DI_MASKDINO.NUM_CLASSES


def compile_layers(model: torch.nn.Module) -> int:
    """Regional torch.compile: every layer of the encoder, the token interaction and the
    decoder compiled on its own (Module.compile, in place; names and weights unchanged).
    Returns the number of layers."""
    count = 0
    for name, module in model.named_modules():
        if re.fullmatch(r"encoder\.layers|head\.decoder\.layers|head\.de_imbalance\.stages\.\d+\.layers", name):
            for layer in module:
                layer.compile()
                count += 1
    return count


def ours_and_release(args):
    """The release's model from its config and ours built from the same config, on the
    release's (perturbed random) weights, converted."""
    # both are imported next to this script (dev/)
    from compare_with_release import import_release, release_architecture, release_config
    from release_training_comparison import our_criterion

    from di_maskdino.modeling import build_parts
    from di_maskdino.release_conversion import convert_release_state_dict

    to = torch.Tensor.to
    source = os.path.abspath(args.release_source)
    _, add_config = import_release(source)
    from di_maskdino.d2.modeling.meta_arch import DIMaskDINOArch  # after the release (see main)

    # `.cuda()` as a move to the CPU through torch's dispatch, so that SyncCounter sees it
    torch.Tensor.cuda = lambda self, *a, **k: to(self, torch.device("cpu"))
    config_file = (
        args.release_config if os.path.isabs(args.release_config) else os.path.join(source, args.release_config)
    )
    cfg = release_config(add_config, config_file)
    opts = (SMALL_RELEASE_OPTS if args.small else []) + list(args.release_opts)
    if opts:
        cfg.defrost()
        cfg.merge_from_list(opts)
        cfg.freeze()

    from detectron2.modeling import build_model

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its loss weights
        release = build_model(cfg).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # no head starts at zero (its gradients would too)
        for tensor in release.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)

    architecture = release_architecture(cfg)
    backbone = copy.deepcopy(release.backbone)
    shapes = {k: v for k, v in backbone.output_shape().items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
    ours = DIMaskDINOArch(
        backbone=backbone,
        **build_parts(architecture, shapes),
        criterion=our_criterion(cfg),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        size_divisibility=32,
        test_topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    ).train()
    converted = convert_release_state_dict(release.state_dict())
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.startswith("criterion.")]
    if missing or unexpected:
        raise SystemExit(
            f"the release's weights do not fit our model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return ours, release, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES


def batch_inputs(args, num_classes: int) -> List[Dict]:
    from benchmark_memory import random_inputs  # next to this script (dev/)

    return random_inputs(args, num_classes, "cpu", seed=0)


def release_inputs(inputs: List[Dict]) -> List[Dict]:
    """The release's mappers store the masks as a tensor, not BitMasks."""
    from detectron2.structures import Instances

    converted = []
    for item in inputs:
        fields = dict(item["instances"].get_fields(), gt_masks=item["instances"].gt_masks.tensor)
        converted.append({**item, "instances": Instances(item["instances"].image_size, **fields)})
    return converted


# ---------------------------------------------------------------------------------------
# the steps and their parts


class PartTimer:
    """Accumulates the wall-clock time of named calls; a name already running is not timed
    again (recursion)."""

    def __init__(self):
        self.times: Dict[str, float] = {}
        self.running = set()

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            if name in self.running:
                return original(*args, **kwargs)
            self.running.add(name)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
                self.running.discard(name)

        setattr(owner, attribute, timed)

    def take(self) -> Dict[str, float]:
        times, self.times = self.times, {}
        return times


class Side:
    """One model in its own trainer, with its calls timed."""

    def __init__(self, name: str, model, trainer, matcher_methods):
        from detectron2.utils.events import EventStorage

        self.name, self.model, self.trainer = name, model, trainer
        self.storage = EventStorage(0)
        self.timer = PartTimer()
        self.timer.wrap(model, "forward", "model")
        self.timer.wrap(model.criterion, "forward", "criterion")
        for method in matcher_methods:
            if hasattr(model.criterion.matcher, method):
                self.timer.wrap(model.criterion.matcher, method, "matcher")
        self.timer.wrap(trainer.optimizer, "step", "optimizer")
        self.records: List[Dict[str, float]] = []

    def step(self, record: bool = True) -> None:
        with self.storage:
            self.storage.iter = self.trainer.iter
            start, cpu = time.perf_counter(), time.process_time()
            self.trainer.run_step()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            self.trainer.iter += 1
        parts = self.timer.take()
        if record:
            model, criterion, matcher = parts.get("model", 0.0), parts.get("criterion", 0.0), parts.get("matcher", 0.0)
            optimizer = parts.get("optimizer", 0.0)
            self.records.append(
                {
                    "step": wall,
                    "cpu": cpu,
                    "forward": model - criterion,
                    "matcher": matcher,
                    "losses": criterion - matcher,
                    "optimizer": optimizer,
                    "backward and the rest": wall - model - optimizer,
                }
            )

    def syncs(self) -> SyncCounter:
        with SyncCounter(self.model) as counter:
            self.step(record=False)
        return counter

    def peak_memory_mib(self) -> float:
        """Peak tensor bytes allocated during one step above those allocated before it: the
        second of two profiled steps (the profiler does not see the release of memory
        allocated before it started, such as the gradients of the step before)."""
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step(record=False)
            with record_function("measured step"):
                pass
            self.step(record=False)
        events = prof.profiler.kineto_results.events()
        start = next(e.start_ns() for e in events if e.name() == "measured step")
        live = peak = base = 0
        for time_ns, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            live += nbytes
            if time_ns >= start:
                peak = max(peak, live)
            else:
                base = live
        return (peak - base) / MIB

    def summary(self) -> Dict:
        medians = {key: statistics.median(r[key] for r in self.records) for key in self.records[0]}
        return {"name": self.name, "median_s": medians, "steps": self.records}


def make_side(name: str, model, inputs: List[Dict], trainer_class: Callable, matcher_methods) -> Side:
    repeated = ([dict(item) for item in inputs] for _ in itertools.count())
    trainer = trainer_class(model, repeated, clipped_adamw(model))
    trainer.iter = 0
    return Side(name, model, trainer, matcher_methods)


# ---------------------------------------------------------------------------------------


def print_report(sides: List[Side], results: List[Dict], top: int) -> None:
    names = [s.name for s in sides]
    print(f"\n{'median per step':<26}" + "".join(f"{n:>14}" for n in names) + ("   ratio" if len(sides) == 2 else ""))
    for key in ("step", "cpu") + PARTS:
        values = [r["median_s"][key] for r in results]
        ratio = f"   {values[0] / values[1]:.2f}" if len(values) == 2 and values[1] > 0 else ""
        label = {"step": "step (wall)", "cpu": "step (process CPU)"}.get(key, f"  {key}")
        print(f"{label:<26}" + "".join(f"{v * 1000:>11.1f} ms" for v in values) + ratio)
    if all("peak_memory_mib" in r for r in results):
        print(f"{'peak memory of a step':<26}" + "".join(f"{r['peak_memory_mib']:>10.1f} MiB" for r in results))
    print(f"{'synchronisations':<26}" + "".join(f"{r['syncs']['total']:>14}" for r in results))
    for r in results:
        print(f"\n{r['name']}: host-device synchronisations of one step, by place")
        for place, count in list(r["syncs"]["by_place"].items())[:top]:
            print(f"  {count:>5}  {place}")
        hidden = len(r["syncs"]["by_place"]) - top
        if hidden > 0:
            print(f"  ... {hidden} more places (--top, --json)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.release_source:
        # the release first: it registers dataset names unconditionally, di_maskdino.d2 keeps
        # the release's registration of a name they share
        ours, release, num_classes = ours_and_release(args)
    else:
        import di_maskdino.d2  # noqa: F401 - before detectron2: imported quietly (di_maskdino/dependencies.py)
    from detectron2.engine import SimpleTrainer

    from di_maskdino.d2.engine.train_step import TrainStep

    if not args.release_source:
        ours, num_classes = ours_alone(args)
    if args.compile_layers:
        print(f"compiled layers: {compile_layers(ours)}")
    inputs = batch_inputs(args, num_classes)
    sides = [make_side("ours", ours, inputs, TrainStep, ("match_all", "forward"))]
    if args.release_source:
        sides.append(make_side("release", release, release_inputs(inputs), SimpleTrainer, ("forward",)))

    for _ in range(args.warmup):
        for side in sides:
            side.step(record=False)
    for _ in range(args.steps):
        for side in sides:
            side.step()
    results = []
    for side in sides:
        result = side.summary()
        counter = side.syncs()
        result["syncs"] = {"total": counter.total, "by_place": counter.by_place()}
        if not args.no_memory:
            result["peak_memory_mib"] = side.peak_memory_mib()
        results.append(result)

    print(
        f"training step, batch {args.batch} x {args.size[0]}x{args.size[1]}, {args.objects} objects per image, "
        f"{torch.get_num_threads()} threads; {args.steps} steps per side after {args.warmup} warm-up"
        + (", alternating" if len(sides) == 2 else "")
    )
    print_report(sides, results, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"arguments": {k: v for k, v in vars(args).items() if k != "size"}, "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer: detectron2's DefaultTrainer with this project's data mapper, optimizer,
checkpointer and COCO evaluation, and with

- exact resume (`resume.py`): the data order continues where it stopped and every RNG
  state is restored, so a resumed run equals the uninterrupted one;
- checkpoints written atomically, the last iteration written once, SOLVER.CHECKPOINTS_TO_KEEP;
- weights that must fill the model (`checkpoint.py`): strictly for resume and evaluation,
  the backbone alone for a training initialisation, anything with MODEL.LOAD_PARTIAL_WEIGHTS;
- the datasets checked before the first iteration (`datasets.py`);
- a non-finite loss stopping the run with the iteration, the terms and the likely causes;
- metrics written to OUTPUT_DIR/metrics_<dataset>.json as strict JSON (null, not NaN).
"""

import contextlib
import json
import logging
import math
import os
import weakref
from typing import Dict, List

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader, build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup, hooks
from detectron2.utils.logger import setup_logger

from .checkpoint import Checkpointer, PeriodicCheckpointer
from .config import load_config, use_available_device
from .datasets import check_dataset_classes, check_images_exist
from .evaluation import build_instance_evaluator
from .panoptic import build_segmentation_evaluators
from .panoptic_data import SEGMENTATION_MAPPERS, build_mapper
from .resume import ResumableTrainingSampler, ResumeState, SeededMapDataset, preserved_rng
from .solver import build_optimizer

__all__ = ["Trainer", "setup", "NonFiniteLossError", "build_periodic_checkpointer", "weights_load_mode"]

logger = logging.getLogger("di_maskdino")


def _create_ddp_model(model, **kwargs):
    # detectron2 passes device_ids=[local rank], which DistributedDataParallel rejects for
    # CPU modules; CPU processes (gloo) need device_ids=None.
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model
d2_defaults.create_ddp_model = _create_ddp_model


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the terms."""


class _NonFiniteLossCheck:
    """Mixin for detectron2's SimpleTrainer / AMPTrainer: before the optimizer step, every
    process reports its non-finite loss terms, and all stop with one message (so that no
    process waits for another). A FloatingPointError raised inside the model (the matcher's
    non-finite cost) gains the iteration."""

    def run_step(self):
        try:
            return super().run_step()
        except FloatingPointError as error:
            if isinstance(error, NonFiniteLossError) or str(error).startswith("iteration "):
                raise
            raise FloatingPointError(f"iteration {self.iter}: {error}") from error

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        iteration = self.iter if iter is None else iter
        bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v.detach()).all())
        everyone = comm.all_gather(bad) if comm.get_world_size() > 1 else [bad]
        if any(everyone):
            raise NonFiniteLossError(self._message(iteration, everyone, len(loss_dict)))
        return super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)

    def _message(self, iteration: int, bad_per_process: List[List[str]], total: int) -> str:
        terms = sorted({k for bad in bad_per_process for k in bad})
        where = (
            "" if len(bad_per_process) == 1 else f" on process(es) {[r for r, b in enumerate(bad_per_process) if b]}"
        )
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        amp = isinstance(self, AMPTrainer)
        return (
            f"the loss became NaN/inf at iteration {iteration}{where}: {len(terms)} of {total} terms - "
            f"{', '.join(terms[:30])}{' ...' if len(terms) > 30 else ''}.\n"
            "Likely causes: a learning rate too high for this batch size "
            f"(SOLVER.BASE_LR; the current largest is {lr:.3g}), "
            + ("half-precision overflow (SOLVER.AMP.ENABLED True; try False), " if amp else "")
            + "or degenerate annotations (boxes or masks of zero size). The last checkpoint in OUTPUT_DIR was written "
            "before this step; fix the cause and continue with --resume."
        )


class _CheckedSimpleTrainer(_NonFiniteLossCheck, SimpleTrainer):
    pass


class _CheckedAMPTrainer(_NonFiniteLossCheck, AMPTrainer):
    pass


def finite_or_null(value):
    """Metrics as strict JSON: NaN and infinities become None (null)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weights_load_mode(cfg, resuming: bool) -> str:
    """How MODEL.WEIGHTS or the last checkpoint must fit the model (see checkpoint.py)."""
    if resuming:
        return "strict"
    return "partial" if cfg.MODEL.LOAD_PARTIAL_WEIGHTS else "init"


def build_periodic_checkpointer(cfg, checkpointer) -> PeriodicCheckpointer:
    """SOLVER.CHECKPOINT_PERIOD, keeping the newest SOLVER.CHECKPOINTS_TO_KEEP (0: all)."""
    keep = cfg.SOLVER.CHECKPOINTS_TO_KEEP
    return PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=keep or None)


def data_seed(cfg) -> int:
    """The seed of the data order and augmentation: SEED, or one drawn and shared by all
    processes when SEED < 0 (it is stored in the checkpoints, so resume continues it)."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        segmentation = cfg.INPUT.DATASET_MAPPER_NAME in SEGMENTATION_MAPPERS  # panoptic / semantic recipes
        for name in cfg.DATASETS.TEST:  # fail now, not after the training, on a broken evaluation set
            check_dataset_classes(name, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, training=False, segmentation=segmentation)
        super().__init__(cfg)
        inner = self._trainer
        checked = _CheckedAMPTrainer if isinstance(inner, AMPTrainer) else _CheckedSimpleTrainer
        self._trainer = checked(inner.model, inner.data_loader, inner.optimizer)

    @property
    def sampler(self) -> ResumableTrainingSampler:
        return self._trainer.data_loader.resumable_sampler

    def build_hooks(self):
        self.checkpointer = Checkpointer(self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        built = super().build_hooks()
        result = []
        for hook in built:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                continue  # replaced below (only the main process has one)
            if isinstance(hook, hooks.EvalHook):
                # every process keeps the states, before the checkpointer that saves them
                result.append(ResumeState(self.sampler, self.cfg.SOLVER.CHECKPOINT_PERIOD))
                if comm.is_main_process():
                    result.append(build_periodic_checkpointer(self.cfg, self.checkpointer))
            result.append(hook)
        return result

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.mode = weights_load_mode(self.cfg, resuming)
        self.checkpointer.what = "the last checkpoint" if resuming else "MODEL.WEIGHTS"
        restored = [h for h in self._hooks if isinstance(h, ResumeState)]
        super().resume_or_load(resume=resume)
        if resuming:
            self.sampler.start_batch = self.start_iter  # one batch per process per iteration
            if not any(h.restored for h in restored):
                logger.warning(
                    "the checkpoint holds no data order or RNG states (written by an older version): training "
                    "continues with the data order skipped ahead, but not bit-exactly as the stopped run would have"
                )

    def train(self):
        result = super().train()
        if comm.is_main_process():
            final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
            if os.path.isfile(final):
                logger.info(f"final weights: {final} (use them with MODEL.WEIGHTS {final})")
        return result

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's batched loader over `ResumableTrainingSampler` and `SeededMapDataset`
        (DATALOADER.SAMPLER_TRAIN TrainingSampler, ASPECT_RATIO_GROUPING, NUM_WORKERS)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported: this trainer's sampler "
                "resumes exactly and follows detectron2's TrainingSampler; set DATALOADER.SAMPLER_TRAIN TrainingSampler"
            )
        segmentation = cfg.INPUT.DATASET_MAPPER_NAME in SEGMENTATION_MAPPERS  # panoptic / semantic recipes
        for name in cfg.DATASETS.TRAIN:
            check_dataset_classes(name, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, training=True, segmentation=segmentation)
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_images_exist(dicts, ", ".join(cfg.DATASETS.TRAIN))
        world = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by {world} processes"
            )
        grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING and all("width" in d and "height" in d for d in dicts)
        seed = data_seed(cfg)
        sampler = ResumableTrainingSampler(
            len(dicts),
            cfg.SOLVER.IMS_PER_BATCH // world,
            seed,
            aspect_ratios=[d["width"] > d["height"] for d in dicts] if grouping else None,
        )
        dataset = SeededMapDataset(dicts, build_mapper(cfg, True))
        loader = build_batch_data_loader(
            dataset,
            sampler,
            cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,  # done by the sampler
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=seed,  # the workers' base seed comes from this, not from the training RNG
        )
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_dataset_classes(
            dataset_name,
            cfg.MODEL.DI_MASKDINO.NUM_CLASSES,
            training=False,
            segmentation=cfg.INPUT.DATASET_MAPPER_NAME in SEGMENTATION_MAPPERS,
        )
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # panoptic / semantic inference on: COCO AP, PQ and mIoU as MODEL.DI_MASKDINO.TEST asks
        segmentation = build_segmentation_evaluators(cfg, dataset_name, output_folder)
        if segmentation is not None:
            return segmentation
        # otherwise COCO box AP, and mask AP unless detection-only; with a box mask head and TEST_MASKS
        # "both", of both kinds of masks
        return build_instance_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation, under autocast to TEST.AUTOCAST_DTYPE when set, leaving the
        training's random draws unchanged; writes metrics_<dataset>.json."""
        with preserved_rng(), evaluation_precision(cfg):
            results = super().test(cfg, model, evaluators)
        # detectron2 returns one dataset's metrics unwrapped
        by_dataset: Dict = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
        if comm.is_main_process():
            for dataset_name, metrics in by_dataset.items():
                path = os.path.join(cfg.OUTPUT_DIR, f"metrics_{dataset_name}.json")
                with open(path, "w") as handle:
                    json.dump(finite_or_null(metrics), handle, indent=2, allow_nan=False)
                logger.info(f"wrote {path}")
        return results


def evaluation_precision(cfg):
    """The autocast context of evaluation: TEST.AUTOCAST_DTYPE on MODEL.DEVICE's type, or
    none (float32) when the key is empty."""
    dtype = cfg.TEST.AUTOCAST_DTYPE
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.MODEL.DEVICE).type, dtype=getattr(torch, dtype))


def setup(args):
    """The frozen configuration of a train_net run (config file and KEY VALUE overrides of
    `args`), on the CPU when CUDA is not available, with detectron2's logging and
    output-folder setup."""
    cfg = load_config(args.config_file, args.opts)
    device_note = use_available_device(cfg)
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.ENABLED = False
        device_note = (device_note + "; " if device_note else "") + "SOLVER.AMP.ENABLED off (AMP needs CUDA)"
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="di_maskdino", abbrev_name="dimd")
    if device_note:
        logger.warning(device_note)
    return cfg

"""The trainer: detectron2's DefaultTrainer with this project's data, model, optimizer,
checkpointer, evaluation and training step, and with

- exact resume: the data order continues where it stopped and every RNG state is restored,
  so a resumed run equals the uninterrupted one (`data/samplers.py`, `hooks.ResumeState`);
- checkpoints written atomically, the last iteration written once, SOLVER.CHECKPOINTS_TO_KEEP;
- weights that must fill the model (`checkpointer.py`): strictly for resume and evaluation,
  the backbone alone for a training initialisation, anything with MODEL.LOAD_PARTIAL_WEIGHTS;
- the datasets checked before the first iteration (`data/datasets/checks.py`);
- a non-finite loss stopping the run with the iteration, the terms and the likely causes
  (`train_step.py`);
- metrics written to OUTPUT_DIR/metrics_<dataset>.json as strict JSON (null, not NaN).
"""

import contextlib
import json
import logging
import math
import os
import weakref
from typing import Dict

import detectron2.utils.comm as comm
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils.logger import setup_logger

from ...dependencies import quiet_unused_parameter_hint
from ...rng import preserved_rng
from ..checkpointer import Checkpointer, PeriodicCheckpointer
from ..data import build_mapper, is_segmentation_recipe
from ..data.datasets import check_dataset_classes, check_images_exist, check_registered
from ..data.samplers import ResumableTrainingSampler, SeededMapDataset
from ..evaluation import build_instance_evaluator, build_segmentation_evaluators
from ..solver import build_optimizer
from .ema import WeightEMAHook, build_ema
from .hooks import ResumeState
from .train_step import TrainStep

__all__ = ["Trainer", "build_periodic_checkpointer", "weights_load_mode", "evaluation_precision", "micro_batch_size"]

logger = logging.getLogger("di_maskdino")


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


def cpu_ddp_arguments(model) -> Dict:
    """DistributedDataParallel's arguments for a model on the CPU (gloo processes): no
    device ids, and `find_unused_parameters`, which keeps DDP's gradient buckets as they were
    first laid out.

    NOTE: DDP lays its buckets out again after the first iteration of a process, by the order
    in which the gradients became ready. With more than two processes a resumed run (whose
    first iteration uses the first layout again) then differs from the uninterrupted one in
    the last bits (tests/tools/test_multi_machine.py: 4 processes). With
    `find_unused_parameters` DDP keeps the first layout and a resumed run equals the
    uninterrupted one with any number of processes, at the cost of a walk of the autograd
    graph per iteration; torch's hint that no parameter was unused is expected and quieted
    (`dependencies.quiet_unused_parameter_hint`). GPU runs keep detectron2's default: their
    reductions and some of their kernels are not bit-reproducible anyway."""
    if next(model.parameters()).device.type != "cpu":
        return {}
    quiet_unused_parameter_hint()
    return {"device_ids": None, "find_unused_parameters": True}


def micro_batch_size(cfg, world: int) -> int:
    """Images per process and micro-batch: SOLVER.IMS_PER_BATCH / (world x
    SOLVER.ACCUMULATION_STEPS), which must divide evenly."""
    steps = cfg.SOLVER.ACCUMULATION_STEPS
    if cfg.SOLVER.IMS_PER_BATCH % (world * steps):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by {world} processes x "
            f"SOLVER.ACCUMULATION_STEPS ({steps}): each process takes micro-batches of IMS_PER_BATCH / "
            "(processes x ACCUMULATION_STEPS) images"
        )
    return cfg.SOLVER.IMS_PER_BATCH // (world * steps)


def data_seed(cfg) -> int:
    """The seed of the data order and augmentation: SEED, or one drawn and shared by all
    processes when SEED < 0 (it is stored in the checkpoints, so resume continues it)."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer's own __init__ makes detectron2's training step and wraps the model in
        # DDP with the GPU of the local rank; this one makes `TrainStep` and wraps CPU
        # processes (gloo) without device ids. The rest is DefaultTrainer's.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
        for name in cfg.DATASETS.TEST:  # fail now, not after the training, on a broken evaluation set
            check_dataset_classes(
                name, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, training=False, segmentation=is_segmentation_recipe(cfg)
            )
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, **cpu_ddp_arguments(model))
        self._trainer = TrainStep(
            model,
            data_loader,
            optimizer,
            amp=cfg.SOLVER.AMP.ENABLED,
            accumulation_steps=cfg.SOLVER.ACCUMULATION_STEPS,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.ema = build_ema(cfg, model)
        if self.ema is not None:
            self.checkpointer.add_checkpointable("model_ema", self.ema)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.resume_state = ResumeState(data_loader.resumable_sampler, cfg.SOLVER.CHECKPOINT_PERIOD)
        self.register_hooks(self.build_hooks())

    @property
    def sampler(self) -> ResumableTrainingSampler:
        return self._trainer.data_loader.resumable_sampler

    def build_hooks(self):
        """DefaultTrainer's hooks, with the EMA update first (MODEL_EMA), `ResumeState` (on
        every process: it gathers the RNG states) and this project's periodic checkpointer (on
        the main process) in place of detectron2's before the evaluation hook, which evaluates
        the EMA weights when MODEL_EMA.USE_FOR_EVALUATION."""
        result = [] if self.ema is None else [WeightEMAHook(self.ema)]
        for hook in super().build_hooks():
            if isinstance(hook, hooks.PeriodicCheckpointer):
                continue  # replaced below (only the main process has one)
            if isinstance(hook, hooks.EvalHook):
                result.append(self.resume_state)
                if comm.is_main_process():
                    result.append(build_periodic_checkpointer(self.cfg, self.checkpointer))
                if self.ema is not None and self.cfg.MODEL_EMA.USE_FOR_EVALUATION:
                    hook = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.test_ema_weights)
            result.append(hook)
        return result

    def test_ema_weights(self):
        """The evaluation of the EMA weights (as DefaultTrainer's evaluation hook does for the
        trained ones)."""
        self._last_eval_results = self.test(self.cfg, self.ema.module)
        return self._last_eval_results

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.mode = weights_load_mode(self.cfg, resuming)
        self.checkpointer.what = "the last checkpoint" if resuming else "MODEL.WEIGHTS"
        super().resume_or_load(resume=resume)
        if self.ema is not None and self.start_iter > 0 and not self.ema.loaded:
            logger.warning("the checkpoint holds no EMA weights: the EMA (MODEL_EMA) restarts from its weights")
            self.ema.restart_from(self._trainer.model)
        if resuming:
            # one micro-batch per process per accumulation step of every iteration
            self.sampler.start_batch = self.start_iter * self.cfg.SOLVER.ACCUMULATION_STEPS
            if not self.resume_state.restored:
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
        segmentation = is_segmentation_recipe(cfg)  # panoptic / semantic recipes
        for name in cfg.DATASETS.TRAIN:
            check_dataset_classes(name, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, training=True, segmentation=segmentation)
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_images_exist(dicts, ", ".join(cfg.DATASETS.TRAIN))
        world = comm.get_world_size()
        micro_batch = micro_batch_size(cfg, world)
        grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING and all("width" in d and "height" in d for d in dicts)
        seed = data_seed(cfg)
        sampler = ResumableTrainingSampler(
            len(dicts),
            micro_batch,
            seed,
            aspect_ratios=[d["width"] > d["height"] for d in dicts] if grouping else None,
        )
        dataset = cls.build_train_dataset(cfg, dicts, micro_batch)
        loader = build_batch_data_loader(
            dataset,
            sampler,
            micro_batch * world,  # the micro-batch of all processes
            aspect_ratio_grouping=False,  # done by the sampler
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=seed,  # the workers' base seed comes from this, not from the training RNG
        )
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_train_dataset(cls, cfg, dicts, micro_batch: int) -> SeededMapDataset:
        """The training dataset the loader reads by (seed, position, index) keys, every
        `micro_batch` consecutive positions one batch: `dicts` mapped by the recipe's mapper."""
        return SeededMapDataset(dicts, build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_registered([dataset_name], "DATASETS.TEST")
        check_dataset_classes(
            dataset_name, cfg.MODEL.DI_MASKDINO.NUM_CLASSES, training=False, segmentation=is_segmentation_recipe(cfg)
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

"""The trainer: detectron2's DefaultTrainer with this project's data mapper, optimizer,
checkpointer and COCO evaluation (whose metrics are also written to
OUTPUT_DIR/metrics_<dataset>.json)."""

import json
import logging
import os
import weakref

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator

from .checkpoint import Checkpointer
from .config import load_config
from .panoptic import build_segmentation_evaluators
from .panoptic_data import build_mapper
from .solver import build_optimizer

__all__ = ["Trainer", "setup"]

logger = logging.getLogger("di_maskdino")


def _create_ddp_model(model, **kwargs):
    # detectron2 passes device_ids=[local rank], which DistributedDataParallel rejects for
    # CPU modules; CPU processes (gloo) need device_ids=None.
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model
d2_defaults.create_ddp_model = _create_ddp_model


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        # the same checkpointer detectron2 builds, with this project's checks
        self.checkpointer = Checkpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # panoptic / semantic inference on: COCO AP, PQ and mIoU as MODEL.DI_MASKDINO.TEST asks
        segmentation = build_segmentation_evaluators(cfg, dataset_name, output_folder)
        if segmentation is not None:
            return segmentation
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        # detectron2 returns one dataset's metrics unwrapped
        by_dataset = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
        if comm.is_main_process():
            for dataset_name, metrics in by_dataset.items():
                path = os.path.join(cfg.OUTPUT_DIR, f"metrics_{dataset_name}.json")
                with open(path, "w") as handle:
                    json.dump(metrics, handle, indent=2)
                logger.info(f"wrote {path}")
        return results


def setup(args):
    """The frozen configuration of a train_net run (config file and KEY VALUE overrides of
    `args`), with detectron2's logging and output-folder setup."""
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logger.warning("SOLVER.AMP.ENABLED is turned off: detectron2's AMP trainer needs CUDA")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    return cfg

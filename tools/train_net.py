#!/usr/bin/env python
"""Training and evaluation of DI-MaskDINO with detectron2's trainer and launcher.

    python tools/train_net.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file ... --resume               # continue in OUTPUT_DIR
    python tools/train_net.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port

MODEL.DEVICE cpu trains and evaluates on the CPU (AMP is then turned off, as detectron2's
AMP trainer needs CUDA); --num-gpus N with MODEL.DEVICE cpu runs N CPU processes (gloo).
Evaluation writes COCO box and mask AP (with AP_S/M/L) to OUTPUT_DIR/metrics_<dataset>.json.
"""
import json
import logging
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import detectron2.engine.defaults as d2_defaults  # noqa: E402
import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.solver.build import get_default_optimizer_params  # noqa: E402

from di_maskdino.d2 import DIMaskDINODatasetMapper, load_config  # noqa: E402

logger = logging.getLogger("di_maskdino")


def _create_ddp_model(model, **kwargs):
    # detectron2 passes device_ids=[local rank], which DistributedDataParallel rejects for
    # CPU modules; CPU processes (gloo) need device_ids=None.
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model
d2_defaults.create_ddp_model = _create_ddp_model


class ReleaseCheckpointError(ValueError):
    pass


class Checkpointer(DetectionCheckpointer):
    """DetectionCheckpointer that recognises an unconverted checkpoint of the authors' release."""

    def _load_model(self, checkpoint):
        names = checkpoint.get("model", {})
        if any(name.startswith("sem_seg_head.") for name in names):
            raise ReleaseCheckpointError(
                "MODEL.WEIGHTS is a checkpoint of the authors' MaskDINO / DI-MaskDINO release; convert it first:\n"
                "  python tools/convert_official_checkpoint.py --input RELEASE.pth --output CONVERTED.pth\n"
                "then set MODEL.WEIGHTS CONVERTED.pth"
            )
        return super()._load_model(checkpoint)


def full_model_gradient_clipping(optimizer_class, max_norm: float, norm_type: float):
    """An optimizer class whose step first clips the gradient norm of all parameters
    together (SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"; detectron2 clips per parameter)."""

    class FullModelClipping(optimizer_class):
        def step(self, closure=None):
            parameters = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelClipping.__name__ = f"{optimizer_class.__name__}FullModelClipping"
    return FullModelClipping


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        # the same checkpointer detectron2 builds, with the release-checkpoint check
        self.checkpointer = Checkpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DIMaskDINODatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DIMaskDINODatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        solver = cfg.SOLVER
        multiplier = solver.BACKBONE_MULTIPLIER
        params = get_default_optimizer_params(
            model,
            base_lr=solver.BASE_LR,
            weight_decay=solver.WEIGHT_DECAY,
            weight_decay_norm=solver.WEIGHT_DECAY_NORM,
            lr_factor_func=lambda name: multiplier if name.startswith("backbone.") else 1.0,
        )
        optimizers = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}
        if solver.OPTIMIZER not in optimizers:
            raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(optimizers)}, got {solver.OPTIMIZER!r}")
        optimizer_class = optimizers[solver.OPTIMIZER]
        clip = solver.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            optimizer_class = full_model_gradient_clipping(optimizer_class, clip.CLIP_VALUE, clip.NORM_TYPE)
        kwargs = {"lr": solver.BASE_LR}
        if solver.OPTIMIZER == "SGD":
            kwargs["momentum"] = solver.MOMENTUM
        optimizer = optimizer_class(params, **kwargs)
        if clip.ENABLED and clip.CLIP_TYPE != "full_model":
            from detectron2.solver.build import maybe_add_gradient_clipping

            optimizer = maybe_add_gradient_clipping(cfg, optimizer)
        return optimizer

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
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logging.getLogger(__name__).warning("SOLVER.AMP.ENABLED is turned off: detectron2's AMP trainer needs CUDA")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if not args.eval_only:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    # evaluation of MODEL.WEIGHTS (or, with --resume, of the last checkpoint in OUTPUT_DIR)
    model = Trainer.build_model(cfg)
    Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    return Trainer.test(cfg, model)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))

#!/usr/bin/env python
"""Training and evaluation of DI-MaskDINO with detectron2's trainer and launcher.

    python tools/train_net.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file ... --resume               # continue in OUTPUT_DIR
    python tools/train_net.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port

Without CUDA the run moves to the CPU and says so (AMP is then turned off, as detectron2's
AMP trainer needs CUDA); --num-gpus N on the CPU runs N CPU processes (gloo). --resume
continues exactly: the same data order and random draws as an uninterrupted run.
Evaluation writes COCO box and mask AP (with AP_S/M/L) to OUTPUT_DIR/metrics_<dataset>.json;
the evaluated checkpoint must fill the model (a mismatch is listed, not half-loaded).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import di_maskdino.d2  # noqa: E402, F401 - first: imports detectron2 without its import-time warnings

# isort: split
from detectron2.engine import default_argument_parser, launch  # noqa: E402

from di_maskdino.allocator import retain_freed_memory  # noqa: E402
from di_maskdino.d2 import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    ConfigError,
    DatasetError,
    NonFiniteLossError,
    Trainer,
    setup,
)

# errors a user causes and fixes (config, weights, dataset, a diverging run): their message
# says what and how, a traceback would only bury it
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, NonFiniteLossError, FileNotFoundError)


def main(args):
    try:
        return run(args)
    except USER_ERRORS as error:
        raise SystemExit(f"{type(error).__name__}: {error}") from error


def run(args):
    cfg = setup(args)
    if not args.eval_only:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    # evaluation of MODEL.WEIGHTS (or, with --resume, of the last checkpoint in OUTPUT_DIR)
    if cfg.MODEL.DEVICE == "cpu":
        retain_freed_memory()  # one forward after another: reuse their memory (di_maskdino/allocator.py)
    model = Trainer.build_model(cfg)
    checkpointer = Checkpointer(model, save_dir=cfg.OUTPUT_DIR, mode="strict", what="MODEL.WEIGHTS")
    if not args.resume or not checkpointer.has_checkpoint():
        if not cfg.MODEL.WEIGHTS:
            raise SystemExit(
                "--eval-only needs weights: set MODEL.WEIGHTS path/to/model_final.pth (or --resume to evaluate the "
                "last checkpoint in OUTPUT_DIR)"
            )
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    return Trainer.test(cfg, model)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    cluster = {"num_machines": args.num_machines, "machine_rank": args.machine_rank, "dist_url": args.dist_url}
    launch(main, args.num_gpus, args=(args,), **cluster)  # one process per GPU (or CPU process), per machine

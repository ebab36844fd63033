#!/usr/bin/env python
"""Training and evaluation of DI-MaskDINO with detectron2's trainer and launcher.

    python tools/train_net.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file ... --resume               # continue in OUTPUT_DIR
    python tools/train_net.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port
    python tools/train_net.py --config-file configs/coco/dimaskdino_r50_12ep.yaml \\
        --coco-dataset my_train data/train.json data/train_images \\
        --coco-dataset my_val data/val.json data/val_images \\
        DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)' MODEL.DI_MASKDINO.NUM_CLASSES 3

Without CUDA the run moves to the CPU and says so (AMP is then turned off); --num-gpus N on
the CPU runs N CPU processes (gloo). --resume continues exactly: the same data order and
random draws as an uninterrupted run. --coco-dataset registers a COCO-format instance
dataset under a name (DATASETS.COCO_FORMAT in a config does the same), checked before the
first iteration. Evaluation writes COCO box and mask AP (with AP_S/M/L) to
OUTPUT_DIR/metrics_<dataset>.json; the evaluated checkpoint must fill the model (a mismatch
is listed, not half-loaded). The CPU inference speed-ups (di_maskdino.cpu_inference) are on
for evaluation; TEST.CPU_SPEEDUPS False turns them off.
"""

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.engine import default_argument_parser, launch

from di_maskdino.cpu_inference import CPUInference
from di_maskdino.d2 import (
    Checkpointer,
    CheckpointError,
    ConfigError,
    DatasetError,
    MissingWeightsError,
    NonFiniteLossError,
    Trainer,
    check_weights,
    setup,
)
from di_maskdino.d2.engine import UnreachableMachineError, wait_for_machine_zero

# errors a user causes and fixes (config, weights, dataset, a diverging run): their message
# says what and how, a traceback would only bury it
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, NonFiniteLossError, MissingWeightsError, FileNotFoundError)


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
    if cfg.MODEL.DEVICE == "cpu" and cfg.TEST.CPU_SPEEDUPS:
        CPUInference().apply_process_settings()  # one forward after another: reuse their memory
    model = Trainer.build_model(cfg)
    checkpointer = Checkpointer.for_evaluation(model, cfg, save_dir=cfg.OUTPUT_DIR)
    if not args.resume or not checkpointer.has_checkpoint():
        check_weights(cfg.MODEL.WEIGHTS, purpose="--eval-only (or --resume, for the last checkpoint in OUTPUT_DIR)")
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    return Trainer.test(cfg, model)


def argument_parser():
    parser = default_argument_parser(__doc__)
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="on a machine of rank > 0: seconds to wait for machine 0 to answer at --dist-url before giving up",
    )
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_FOLDER"),
        help="register a COCO-format instance dataset under NAME (repeat for more; replaces DATASETS.COCO_FORMAT); "
        "use NAME in DATASETS.TRAIN / DATASETS.TEST",
    )
    return parser


def parse_args(argv=None):
    args = argument_parser().parse_args(argv)
    if args.coco_dataset:  # replaces the config's DATASETS.COCO_FORMAT
        args.opts += ["DATASETS.COCO_FORMAT", repr([list(entry) for entry in args.coco_dataset])]
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.num_machines > 1 and args.machine_rank > 0:
        try:
            wait_for_machine_zero(args.dist_url, args.dist_timeout)
        except UnreachableMachineError as error:
            raise SystemExit(f"UnreachableMachineError: {error}") from error
    cluster = {"num_machines": args.num_machines, "machine_rank": args.machine_rank, "dist_url": args.dist_url}
    launch(main, args.num_gpus, args=(args,), **cluster)  # one process per GPU (or CPU process), per machine

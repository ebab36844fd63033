"""Training as tools/train_net.py runs it, except that the images of a batch share one short
edge: each batch draws it from INPUT.MIN_SIZE_TRAIN (seeded by the batch's place in the
stream), so that multi-scale training has no padding inside a batch.

    python dev/train_same_size_batches.py --config-file configs/quick_start.yaml \\
        INPUT.MIN_SIZE_TRAIN "(96, 128)" OUTPUT_DIR output/same_size_batches

The benchmarks page trains the model without the padding mask this way beside the padding
mask's runs (docs/benchmarks.md, "Padding mask"): the same image sizes, no padding between
them. Instance recipes with INPUT.MIN_SIZE_TRAIN_SAMPLING "choice" ("resize" and "lsj"
mappers); one process (the batch of a position is that process's).
"""

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.engine import default_argument_parser

from di_maskdino.d2 import Trainer, setup
from di_maskdino.d2.data import build_mapper
from di_maskdino.d2.data.samplers import SeededMapDataset, sample_seed


class SameSizeBatches(SeededMapDataset):
    """dataset[index] mapped at one short edge per batch: `mappers` maps each short edge to
    the recipe's mapper at that edge; the positions `batch_size` * b ... of the stream form
    batch b, whose edge is drawn from (seed, b)."""

    def __init__(self, dataset, mappers, batch_size: int):
        super().__init__(dataset, mapper=None)
        self.mappers = mappers
        self.sizes = sorted(mappers)
        self.batch_size = batch_size

    def short_edge(self, seed: int, position: int) -> int:
        return self.sizes[sample_seed(seed, position // self.batch_size) % len(self.sizes)]

    def __getitem__(self, key):
        seed, position, index = key
        self.mapper = self.mappers[self.short_edge(seed, position)]
        return super().__getitem__(key)


class SameSizeBatchTrainer(Trainer):
    @classmethod
    def build_train_dataset(cls, cfg, dicts, micro_batch):
        if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "choice":
            raise SystemExit(
                f"INPUT.MIN_SIZE_TRAIN_SAMPLING is {cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING!r}: this tool draws one of the "
                "short edges of INPUT.MIN_SIZE_TRAIN per batch; use 'choice'"
            )
        mappers = {}
        for size in cfg.INPUT.MIN_SIZE_TRAIN:
            single = cfg.clone()
            single.defrost()
            single.INPUT.MIN_SIZE_TRAIN = (size,)
            mappers[size] = build_mapper(single, True)
        return SameSizeBatches(dicts, mappers, micro_batch)


def main(argv=None):
    args = default_argument_parser(__doc__).parse_args(argv)
    if args.num_gpus > 1 or args.num_machines > 1 or args.eval_only:
        raise SystemExit("this tool trains in one process: no --num-gpus, --num-machines or --eval-only")
    cfg = setup(args)
    trainer = SameSizeBatchTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    main()

"""The training stream, resumable: batch k is a function of the data seed and k alone.

- `ResumableTrainingSampler` is detectron2's `TrainingSampler` stream (a seeded shuffle per
  pass over the dataset, shared out over the processes) with the aspect-ratio grouping of
  detectron2's `AspectRatioGroupedDataset` done on indices; on resume it skips the batches
  already consumed without reading them.
- `SeededMapDataset` maps each sample under RNGs seeded from (data seed, position of the
  sample in the stream), so a sample's crop and flip do not depend on which worker maps it,
  on how many there are, or on what that worker mapped before (a resumed worker starts
  where the stopped one would have been).
The RNG states of the training processes themselves are saved and restored by
`di_maskdino.d2.engine.hooks.ResumeState`.
"""

import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

from ...rng import preserved_rng

__all__ = ["ResumableTrainingSampler", "SeededMapDataset", "sample_seed"]


def sample_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the sample at `position` of the stream of a run with data seed `seed`."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class ResumableTrainingSampler(Sampler):
    """The infinite training stream of this process as (seed, position, dataset index),
    batch by batch: every `batch_size` consecutive items form one batch.

    The global stream is detectron2's TrainingSampler order (`torch.randperm` of the dataset
    per pass, from a generator seeded with `seed`); process `rank` of `world_size` takes
    items rank, rank + world_size, ... With `aspect_ratios` (True for width > height, per
    dataset item) a batch holds items of one kind only, filled in stream order as
    detectron2's AspectRatioGroupedDataset does. `start_batch` batches are skipped.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        *,
        aspect_ratios: Optional[Sequence[bool]] = None,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler: the dataset is empty (size {size})")
        if aspect_ratios is not None and len(aspect_ratios) != size:
            raise ValueError("ResumableTrainingSampler: one aspect flag per dataset item is needed")
        self.size = size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.aspect_ratios = None if aspect_ratios is None else [bool(a) for a in aspect_ratios]
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_batch = 0

    def _stream(self) -> Iterator[Tuple[int, int]]:
        """(global position, dataset index) of this process's items."""
        generator = torch.Generator().manual_seed(self.seed)
        position = 0
        while True:
            order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
            for index in order.tolist():
                if position % self.world_size == self.rank:
                    yield position, index
                position += 1

    def batches(self) -> Iterator[List[Tuple[int, int]]]:
        """Batches of (global position, dataset index), from batch 0 on."""
        if self.aspect_ratios is None:
            batch = []
            for item in self._stream():
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        buckets: Dict[bool, List[Tuple[int, int]]] = {False: [], True: []}
        for item in self._stream():
            bucket = buckets[self.aspect_ratios[item[1]]]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        for number, batch in enumerate(self.batches()):
            if number >= self.start_batch:
                for position, index in batch:
                    yield self.seed, position, index


class SeededMapDataset(Dataset):
    """dataset[index] mapped by `mapper`, keyed by the sampler's (seed, position, index): the
    python, numpy and torch RNGs are seeded from (seed, position) for the call and restored
    afterwards (so mapping in the training process itself draws nothing from its RNGs)."""

    def __init__(self, dataset: Sequence[dict], mapper):
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int, int]):
        seed, position, index = key
        with preserved_rng():
            value = sample_seed(seed, position)
            random.seed(value)
            np.random.seed(value)
            torch.manual_seed(value)
            mapped = self.mapper(self.dataset[index])
        if mapped is None:
            raise ValueError(f"the dataset mapper returned nothing for {self.dataset[index].get('file_name', index)}")
        return mapped

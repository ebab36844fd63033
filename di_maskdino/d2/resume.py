"""Exact resume: a run stopped after iteration i and resumed equals the uninterrupted run.

Three things make a training step depend on the past, and each is made resumable:

- the data order: `ResumableTrainingSampler` is detectron2's `TrainingSampler` stream
  (a seeded shuffle per pass over the dataset, shared out over the processes) with the
  aspect-ratio grouping of detectron2's `AspectRatioGroupedDataset` done on indices, so
  that batch k is a function of the seed and k alone; on resume it skips the batches
  already consumed without reading them.
- the augmentation draws in the data workers: `SeededMapDataset` maps each sample under
  RNGs seeded from (data seed, position of the sample in the stream), so a sample's crop
  and flip do not depend on which worker maps it, on how many there are, or on what that
  worker mapped before (a worker's RNG state is then a function of the position, and a
  resumed worker starts where the stopped one would have been).
- the RNG of each training process (denoising noise, point sampling, dropout):
  `ResumeState`, a hook, gathers the torch / CUDA / numpy / python RNG states of every
  process whenever a checkpoint is written, stores them and the data seed in the
  checkpoint, and restores them (each process its own) on resume.
"""

import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

__all__ = [
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "ResumeState",
    "rng_states",
    "set_rng_states",
    "preserved_rng",
]


def rng_states() -> Dict[str, Any]:
    """The RNG states of this process: torch (CPU and every CUDA device), numpy, python, in
    types a weights-only `torch.load` reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restores what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class preserved_rng:
    """Context manager: the RNG states of this process are the same after the block as
    before it (evaluation during training must not change what training draws next)."""

    def __enter__(self):
        self._states = rng_states()
        return self

    def __exit__(self, *exc):
        set_rng_states(self._states)
        return False


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


class ResumeState(HookBase):
    """Stores in every checkpoint what exact resume needs besides the model, optimizer,
    scheduler and iteration: the data seed and the RNG states of every process; restores
    them on resume and makes the sampler skip the batches already consumed.

    Register it before the PeriodicCheckpointer hook and on every process: it gathers the
    states (a collective) at the iterations the checkpointer saves at."""

    def __init__(self, sampler: ResumableTrainingSampler, period: int):
        self.sampler = sampler
        self.period = period
        self._gathered: Optional[List[Dict[str, Any]]] = None
        self.restored = False  # set by load_state_dict

    def _saves_now(self) -> bool:
        iteration = self.trainer.iter
        return (iteration + 1) % self.period == 0 or iteration >= self.trainer.max_iter - 1

    def after_step(self):
        if self._saves_now():
            states = rng_states()
            self._gathered = comm.all_gather(states) if comm.get_world_size() > 1 else [states]

    def state_dict(self) -> Dict[str, Any]:
        if self._gathered is None:
            return {}
        return {"data_seed": self.sampler.seed, "world_size": len(self._gathered), "rng": self._gathered}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The data seed, and this process's RNG states when the process count is unchanged
        (the trainer makes the sampler skip the consumed batches)."""
        self.sampler.seed = int(state["data_seed"])
        self.restored = True
        world = comm.get_world_size()
        if state.get("world_size") != world:
            logger.warning(
                f"the checkpoint was written by {state.get('world_size')} training processes and is resumed with "
                f"{world}: training continues, but not exactly as the stopped run would have (each process "
                "draws differently). Resume with the same number of processes for an exact continuation."
            )
            return
        set_rng_states(state["rng"][comm.get_rank()])

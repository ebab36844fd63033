"""Exact resume: the data order, the per-sample augmentation draws and the RNG states."""

import itertools
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data.build import build_batch_data_loader  # noqa: E402
from detectron2.data.samplers import TrainingSampler  # noqa: E402

from di_maskdino.d2.data.samplers import ResumableTrainingSampler, SeededMapDataset  # noqa: E402
from di_maskdino.rng import preserved_rng, rng_states, set_rng_states  # noqa: E402
from tests.tooling import QUICK, ROOT  # noqa: E402


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_order_is_detectron2s_training_sampler():
    """Without aspect grouping and with one process, the indices are TrainingSampler's."""
    ours = [index for _, _, index in take(iter(ResumableTrainingSampler(7, 3, seed=5, rank=0, world_size=1)), 30)]
    assert ours == take(iter(TrainingSampler(7, seed=5)), 30)


def test_processes_share_the_stream():
    ranks = [ResumableTrainingSampler(9, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    positions = sorted(p for sampler in ranks for _, p, _ in take(iter(sampler), 12))
    assert positions == list(range(36))  # every position of the global stream exactly once


def test_skipping_gives_the_rest_of_the_stream():
    aspect = [i % 3 == 0 for i in range(11)]
    full = ResumableTrainingSampler(11, 4, seed=3, aspect_ratios=aspect, rank=0, world_size=1)
    later = ResumableTrainingSampler(11, 4, seed=3, aspect_ratios=aspect, rank=0, world_size=1)
    later.start_batch = 5
    assert take(iter(later), 40) == take(iter(full), 60)[20:]
    # aspect grouping: every batch of 4 holds one kind only
    for batch in take(full.batches(), 20):
        assert len({aspect[index] for _, index in batch}) == 1


class RandomMapper:
    """Draws from all three RNGs, as augmentations do."""

    def __call__(self, item):
        return (item, random.random(), float(np.random.uniform()), float(torch.rand(())))


def batches(num_workers, start_batch=0, n=6):
    sampler = ResumableTrainingSampler(10, 2, seed=11, rank=0, world_size=1)
    sampler.start_batch = start_batch
    loader = build_batch_data_loader(
        SeededMapDataset(list(range(10)), RandomMapper()), sampler, 2, num_workers=num_workers, seed=11
    )
    return take(iter(loader), n)


def test_draws_depend_on_the_position_only():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    plain = batches(0, n=8)
    assert torch.equal(torch.get_rng_state(), before)  # mapping in this process leaves its RNG alone
    assert batches(2, n=8) == plain  # two worker processes draw the same
    assert batches(2, start_batch=3, n=5) == plain[3:]  # a resumed loader continues the sequence


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # a cached gaussian is part of numpy's state
    states = rng_states()
    expected = (random.random(), np.random.normal(), torch.rand(3))
    torch.save(states, tmp_path / "rng.pth")
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    set_rng_states(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    set_rng_states(states)
    with preserved_rng():  # draws inside the block do not move the states
        torch.rand(5)
        random.random()
        np.random.normal()
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


# ------------------------------------------------------------------ whole training runs

TINY = [
    "SOLVER.MAX_ITER",
    "6",
    "SOLVER.CHECKPOINT_PERIOD",
    "3",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "MODEL.DI_MASKDINO.LOSS.TRAIN_NUM_POINTS",
    "256",
    "DATASETS.TEST",
    "()",
    "DATALOADER.NUM_WORKERS",
    "2",
]


def train(output, data_root, extra=(), resume=False, kill_after_checkpoint=False, overrides=()):
    """tools/train_net.py on the tiny setting; with `kill_after_checkpoint` the process group
    is killed as soon as a checkpoint is tagged (mid-run, as an interruption would)."""
    command = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", QUICK]
    command += ["--resume"] if resume else []
    command += list(extra) + TINY + list(overrides) + ["OUTPUT_DIR", str(output)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root))
    output.mkdir(parents=True, exist_ok=True)
    log = output.parent / f"{output.name}.{'resumed' if resume else 'first'}.out"
    with open(log, "w") as stream:  # a file, not a pipe: nothing blocks on a full pipe
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
        if kill_after_checkpoint:
            tag = output / "last_checkpoint"
            while process.poll() is None and not tag.exists():
                time.sleep(0.05)
            assert process.poll() is None, "the run ended before it could be interrupted"
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
        process.wait()
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def final_weights(output, entry="model"):
    return torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)[entry]


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9"]
ACCUMULATION = ["SOLVER.ACCUMULATION_STEPS", "2", "SOLVER.IMS_PER_BATCH", "4"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "processes,settings",
    [(1, []), (2, []), (1, EMA), (2, EMA + ACCUMULATION)],
    ids=["1", "2", "1-ema", "2-ema-accumulation"],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data_root, tmp_path, processes, settings):
    """6 iterations, against 3 (killed after the checkpoint of iteration 2) + resumed; data
    workers 2; one process, then two CPU processes; with the EMA of the weights (its average
    too), and with gradient accumulation."""
    extra = ["--num-gpus", str(processes)]
    train(tmp_path / "whole", data_root, extra, overrides=settings)
    interrupted = tmp_path / "interrupted"
    train(interrupted, data_root, extra, kill_after_checkpoint=True, overrides=settings)
    assert (interrupted / "last_checkpoint").read_text() == "model_0000002.pth"
    log = train(interrupted, data_root, extra, resume=True, overrides=settings)
    assert "Starting training from iteration 3" in log
    assert_bit_equal(final_weights(tmp_path / "whole"), final_weights(interrupted))
    if "MODEL_EMA.ENABLED" not in settings:
        return
    ema = final_weights(interrupted, "model_ema")
    assert_bit_equal(final_weights(tmp_path / "whole", "model_ema"), ema)
    assert any(not torch.equal(ema[k], v) for k, v in final_weights(interrupted).items())  # an average

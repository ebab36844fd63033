"""Hooks of the trainer.

`ResumeState` makes a resumed run equal the uninterrupted one: three things make a training
step depend on the past - the data order and the augmentation draws (made resumable by
`di_maskdino.d2.data.samplers`), and the RNG of each training process (denoising noise,
point sampling, dropout), which this hook gathers from every process whenever a checkpoint
is written, stores in the checkpoint with the data seed, and restores on resume (each
process its own).
"""

import logging
from typing import Any, Dict, List, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ...rng import rng_states, set_rng_states
from ..data.samplers import ResumableTrainingSampler

logger = logging.getLogger(__name__)

__all__ = ["ResumeState"]


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

"""detectron2's checkpointer with this project's guarantees.

Saving: every checkpoint (and `last_checkpoint`, updated only after it) is written to a
temporary file and renamed into place, so a kill at any moment leaves the previous state
loadable. `PeriodicCheckpointer` does not write the last iteration twice (model_XXXXXXX.pth
and model_final.pth) and can keep only the newest periodic checkpoints
(SOLVER.CHECKPOINTS_TO_KEEP).

Loading, by `mode`:
  "strict"    (evaluation, demo, export, resume) the checkpoint must fill the model exactly;
              otherwise `CheckpointMismatchError` lists what is missing, mis-shaped or
              unexpected.
  "init"      (training from MODEL.WEIGHTS) as strict, but a checkpoint that fills only the
              backbone (ImageNet initialisation), or everything but an added part
              (`ADDED_PARTS`: a box mask head on a trained detector), is accepted.
  "partial"   (MODEL.LOAD_PARTIAL_WEIGHTS, fine-tuning e.g. with another class count) loads
              what fits and logs the rest.
A missing or unreadable file raises `CheckpointError` naming it and the fix; an unconverted
release checkpoint raises `ReleaseCheckpointError` with the conversion command.
"""

import glob
import logging
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks

from ..checkpoint_files import CheckpointReadError, atomic_torch_save, atomic_write, read_checkpoint

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CheckpointMismatchError",
    "ReleaseCheckpointError",
    "PeriodicCheckpointer",
    "LOAD_MODES",
    "missing_without_aliases",
]

logger = logging.getLogger(__name__)

LOAD_MODES = ("strict", "init", "partial")
# optional parts a training config adds on top of a trained model: "init" accepts a checkpoint
# that lacks exactly them (the box mask head trained on a frozen detector)
ADDED_PARTS = ("box_mask_head.",)
LISTED = 40  # names listed per kind of mismatch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that does not fill the model (missing, mis-shaped or unexpected entries)."""


class ReleaseCheckpointError(CheckpointError):
    """MODEL.WEIGHTS is an unconverted checkpoint of the authors' release."""


def missing_without_aliases(model: torch.nn.Module, absent: Iterable[str]) -> List[str]:
    """The names of `absent` that are really missing: a parameter or buffer shared under
    several names (tied weights) is loaded when any of its names is, so its other names are
    not reported."""
    absent = set(absent)
    names_of: Dict[int, set] = defaultdict(set)
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        names_of[id(tensor)].add(name)
    for names in names_of.values():
        if names & absent and not names <= absent:
            absent -= names
    return sorted(absent)


def _listing(title: str, lines: Sequence[str]) -> str:
    shown = [f"    {line}" for line in lines[:LISTED]]
    if len(lines) > LISTED:
        shown.append(f"    ... and {len(lines) - LISTED} more")
    return f"  {title} ({len(lines)}):\n" + "\n".join(shown)


class Checkpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saving, load modes (see the module docstring) and
    errors that name the file. `what` names the file's role in messages. With `ema_weights`,
    a checkpoint that holds EMA weights ("model_ema", MODEL_EMA) loads those into the model
    instead of its trained weights (evaluation); one without loads its trained weights."""

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        mode: str = "strict",
        what: str = "checkpoint",
        ema_weights: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.mode = mode
        self.what = what
        self.ema_weights = ema_weights
        self._path = None

    @classmethod
    def for_evaluation(cls, model, cfg, save_dir: str = "") -> "Checkpointer":
        """The checkpointer that loads MODEL.WEIGHTS (or, in `save_dir`, the last checkpoint)
        for evaluation: strictly, the EMA weights when MODEL_EMA.ENABLED and
        MODEL_EMA.USE_FOR_EVALUATION."""
        ema = cfg.MODEL_EMA.ENABLED and cfg.MODEL_EMA.USE_FOR_EVALUATION
        return cls(model, save_dir, mode="strict", what="MODEL.WEIGHTS", ema_weights=ema)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in LOAD_MODES:
            raise ValueError(f"Checkpointer mode must be one of {LOAD_MODES}, got {value!r}")
        self._mode = value

    # ---------------------------------------------------------------- saving
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        for stale in glob.glob(os.path.join(self.save_dir, f".{name}.pth.*.tmp")):
            os.remove(stale)  # left by a save that was killed
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda stream: stream.write(last_filename_basename), mode="w")

    # ---------------------------------------------------------------- loading
    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(
                f"{self.what} {path}: no such file. Set MODEL.WEIGHTS to a checkpoint of this project "
                "(OUTPUT_DIR/model_final.pth of a training run, or a released checkpoint converted with "
                "tools/convert_official_checkpoint.py; see MODEL_ZOO.md)."
            )
        self._path = path
        try:
            return super().load(path, *args, **kwargs)
        except (OSError, RuntimeError) as error:
            if path and "://" in path and not isinstance(error, CheckpointError):
                raise CheckpointError(
                    f"{self.what} {path} could not be fetched ({error}). On a machine without internet access, "
                    "download it elsewhere and set MODEL.WEIGHTS to the local file."
                ) from error
            raise
        finally:
            self._path = None

    def _torch_load(self, f):
        # NOTE: detectron2's DetectionCheckpointer reads every file but .pkl / .pyth through
        # this method (after its own URL handling), and offers no public hook there; it is
        # overridden so that unreadable files get `read_checkpoint`'s errors.
        # tests/d2/test_checkpointer.py fails if detectron2 stops calling it.
        try:
            return read_checkpoint(f, what=self.what)
        except CheckpointReadError as error:
            raise CheckpointError(str(error) + self._other_checkpoints(f)) from error

    def _other_checkpoints(self, broken: str) -> str:
        folder = os.path.dirname(os.path.abspath(broken))
        others = sorted(
            f
            for f in os.listdir(folder)
            if f.endswith(".pth")
            and os.path.join(folder, f) != os.path.abspath(broken)
            and os.path.getsize(os.path.join(folder, f)) > 0
        )
        if not others or os.path.basename(broken) not in (self._last_tagged(folder) or ""):
            return ""
        return (
            f"\nOther checkpoints in {folder}: {', '.join(others)}. To resume from one of them, write its name "
            f"into {os.path.join(folder, 'last_checkpoint')}."
        )

    @staticmethod
    def _last_tagged(folder: str):
        try:
            with open(os.path.join(folder, "last_checkpoint")) as handle:
                return handle.read().strip()
        except OSError:
            return None

    def _load_model(self, checkpoint):
        if self.ema_weights:
            if "model_ema" in checkpoint:
                logger.info(f"{self.what} {self._path}: loading its EMA weights (MODEL_EMA.USE_FOR_EVALUATION)")
                checkpoint["model"] = checkpoint.pop("model_ema")
            else:
                logger.info(f"{self.what} {self._path} holds no EMA weights: loading its trained weights")
        names = checkpoint.get("model", {})
        if any(name.startswith("sem_seg_head.") for name in names):
            raise ReleaseCheckpointError(
                f"{self.what} {self._path} is a checkpoint of the authors' MaskDINO / DI-MaskDINO release; convert "
                "it first:\n"
                "  python tools/convert_official_checkpoint.py --input RELEASE.pth --output CONVERTED.pth\n"
                "then set MODEL.WEIGHTS CONVERTED.pth (with the config the converter names)"
            )
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if not checkpoint.get("matching_heuristics", False):
            # checked before anything is loaded, so that a refused checkpoint leaves the model as it was
            state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in names.items()}
            shapes = [
                (k, tuple(v.shape), expected[k])
                for k, v in state.items()
                if k in expected and tuple(v.shape) != expected[k]
            ]
            absent = [k for k in expected if k not in state]
            unexpected = sorted(k for k in state if k not in expected)
            self._check_fit(expected, absent, shapes, unexpected)
            return super()._load_model(checkpoint)
        # detectron2's name matching (ImageNet .pkl files): checked on what it loaded
        incompatible = super()._load_model(checkpoint)
        self._check_fit(
            expected, incompatible.missing_keys, list(incompatible.incorrect_shapes), incompatible.unexpected_keys
        )
        return incompatible

    def _check_fit(self, expected: Dict, absent: List[str], shapes: List[Tuple], unexpected: List[str]) -> None:
        shapes = sorted(shapes)
        mis_shaped = {name for name, _, _ in shapes}
        loaded = [k for k in expected if k not in set(absent) and k not in mis_shaped]
        reported = missing_without_aliases(self.model, absent)
        missing = sorted(k for k in reported if k in expected and k not in mis_shaped)
        self._check(missing, shapes, sorted(unexpected), loaded, len(expected))

    def _check(self, missing: List[str], shapes: List[Tuple], unexpected: List[str], loaded, total: int) -> None:
        if not (missing or shapes or unexpected):
            return
        if self.mode == "partial":
            logger.warning(
                f"MODEL.LOAD_PARTIAL_WEIGHTS: {len(loaded)} of {total} entries loaded from {self._path}; "
                f"{len(missing)} missing, {len(shapes)} mis-shaped, {len(unexpected)} unused (listed below)"
            )
            return  # detectron2 lists them
        if (
            self.mode == "init"
            and not (shapes or unexpected)
            and missing
            and all(k.startswith(ADDED_PARTS) for k in missing)
        ):
            logger.info(
                f"{self.what} {self._path} fills the model but for the parts it adds ({len(missing)} entries of "
                f"{', '.join(sorted({k.split('.')[0] for k in missing}))}), which start from their own initialisation"
            )
            return
        if self.mode == "init" and not shapes and loaded and all(k.startswith("backbone.") for k in loaded):
            backbone_missing = [k for k in missing if k.startswith("backbone.")]
            if not backbone_missing:
                logger.info(
                    f"{self.what} {self._path} initialises the backbone ({len(loaded)} entries); the rest of the "
                    f"model ({len(missing)} entries) starts from its own initialisation"
                )
                return
        parts = [
            f"{self.what} {self._path} does not fit the model built from the config: "
            f"{len(loaded)} of {total} entries would load."
        ]
        if missing:
            parts.append(_listing("missing from the checkpoint", missing))
        if shapes:
            parts.append(
                _listing(
                    "shape in the checkpoint vs the model",
                    [f"{name}: {tuple(theirs)} vs {tuple(ours)}" for name, theirs, ours in shapes],
                )
            )
        if unexpected:
            parts.append(_listing("in the checkpoint but not in the model", unexpected))
        parts.append(
            "Use the config the checkpoint was trained with (for a converted release checkpoint, the config "
            "tools/convert_official_checkpoint.py names). To fine-tune from it on purpose (e.g. another class "
            "count), train with MODEL.LOAD_PARTIAL_WEIGHTS True."
        )
        raise CheckpointMismatchError("\n".join(parts))


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointing hook: `model_XXXXXXX` every `period` iterations and
    `model_final` after the last one, which is not written a second time as a periodic
    checkpoint; with `max_to_keep`, only the newest `max_to_keep` checkpoints are kept,
    model_final.pth counting as the newest (it holds everything resuming needs)."""

    def step(self, iteration: int, **kwargs) -> None:
        iteration = int(iteration)
        state: Dict = {"iteration": iteration, **kwargs}
        last = self.max_iter is not None and iteration >= self.max_iter - 1
        if (iteration + 1) % self.period == 0 and not last:
            self.checkpointer.save(f"{self.file_prefix}_{iteration:07d}", **state)
        elif last:
            self.checkpointer.save(f"{self.file_prefix}_final", **state)
        else:
            return
        if self.max_to_keep is not None:
            self.recent_checkpoints.append(self.checkpointer.get_checkpoint_file())
            while len(self.recent_checkpoints) > self.max_to_keep:
                old = self.recent_checkpoints.pop(0)
                if os.path.exists(old) and not old.endswith(f"{self.file_prefix}_final.pth"):
                    os.remove(old)

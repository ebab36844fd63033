"""Checkpoint files: written so that an interruption never leaves a broken file in place, read
with errors that name the file and the fix. Needs only PyTorch.

- `atomic_write(path, write)`: `write(handle)` fills a temporary file in the same folder,
  which is flushed to disk and then renamed over `path`; a kill at any moment leaves either
  the old file or the new one, never a truncated one.
- `read_checkpoint(path, trust_pickle=False)`: `torch.load` with `CheckpointReadError` for a
  missing, empty, truncated or non-weights-only file.
- `is_project_state_dict(state)`: whether a state dict already has this project's names.
"""

import os
import tempfile
from typing import IO, Any, Callable, Mapping

import torch

__all__ = ["CheckpointReadError", "atomic_write", "atomic_torch_save", "read_checkpoint", "is_project_state_dict"]


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the fix."""


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Writes `path` through a temporary file of the same folder renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    try:  # make the rename itself durable
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def read_checkpoint(path: str, trust_pickle: bool = False, what: str = "checkpoint") -> Any:
    """torch.load(path) on the CPU, weights-only unless `trust_pickle`; `what` names the file's
    role in error messages (e.g. "MODEL.WEIGHTS")."""
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{what} {path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointReadError(
            f"{what} {path} is empty (0 bytes): a write of it was interrupted. Use an earlier checkpoint "
            "(OUTPUT_DIR/model_*.pth), or delete it and rerun the step that writes it."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # noqa: BLE001 - every failure of torch.load is reported with the file
        text = str(error)
        if not trust_pickle and "weights_only" in text.replace(" ", "_").lower():
            raise CheckpointReadError(
                f"{what} {path} holds pickled objects other than tensors, which a weights-only load refuses "
                f"({text.splitlines()[0]}). If you trust the file, allow them (--trust-pickle where the tool "
                "has it)."
            ) from error
        raise CheckpointReadError(
            f"{what} {path} ({size} bytes) is corrupt or truncated and cannot be read ({type(error).__name__}: "
            f"{text.splitlines()[0] if text else 'no message'}). Copy or download it again, or use an earlier "
            "checkpoint."
        ) from error


PROJECT_PREFIXES = ("encoder.", "head.")


def is_project_state_dict(state: Mapping[str, Any]) -> bool:
    """True when the names are this project's (encoder.*, head.*), not the release's (sem_seg_head.*)."""
    names = list(state)
    return (
        bool(names)
        and any(n.startswith(PROJECT_PREFIXES) for n in names)
        and not any(n.startswith("sem_seg_head.") for n in names)
    )

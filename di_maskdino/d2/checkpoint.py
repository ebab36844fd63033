"""detectron2's checkpointer, with the checks this project adds on loading."""

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["Checkpointer", "ReleaseCheckpointError"]


class ReleaseCheckpointError(ValueError):
    """MODEL.WEIGHTS is an unconverted checkpoint of the authors' release."""


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

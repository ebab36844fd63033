"""Evaluation of panoptic and semantic outputs: COCO PQ (`PanopticEvaluator`) and, with
detectron2's evaluators, box / mask AP of the things and mIoU, in one pass
(`build_segmentation_evaluators`).

PQ is computed with panopticapi (installed from its repository, see INSTALL.md) or, where it
is absent, with hotcoco (PyPI), whose PQ equals panopticapi's (tests/d2/evaluation/).
"""

import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from PIL import Image

from ...panoptic_format import id_to_rgb
from .instance import InstanceEvaluator

__all__ = ["PanopticEvaluator", "pq_backend", "build_segmentation_evaluators", "PQ_BACKENDS"]

logger = logging.getLogger(__name__)

PQ_BACKENDS = ("panopticapi", "hotcoco")
_NO_PQ_BACKEND = (
    "PQ needs panopticapi or hotcoco. Install panopticapi from its repository, as detectron2: "
    "pip install git+https://github.com/cocodataset/panopticapi.git (or pip install PATH/TO/panopticapi for a "
    "local checkout), or: pip install hotcoco"
)


def pq_backend(preferred: Optional[str] = None) -> str:
    """The PQ implementation to use: `preferred`, else panopticapi if installed, else hotcoco."""
    candidates = [preferred] if preferred else list(PQ_BACKENDS)
    for name in candidates:
        if name not in PQ_BACKENDS:
            raise ValueError(f"unknown PQ backend {name!r}; choose one of {PQ_BACKENDS}")
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise ImportError(_NO_PQ_BACKEND if not preferred else f"{preferred} is not installed. {_NO_PQ_BACKEND}")


def _pq_compute(backend: str):
    if backend == "panopticapi":
        from panopticapi.evaluation import pq_compute
    else:
        from hotcoco.panoptic import pq_compute
    return pq_compute


class PanopticEvaluator(COCOPanopticEvaluator):
    """detectron2's COCO PQ evaluation (same inputs, same metrics: PQ, SQ, RQ overall, of
    things "_th" and of stuff "_st", in percent), computed by `backend` ("panopticapi" or
    "hotcoco"; default: whichever is installed, panopticapi first)."""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, backend: Optional[str] = None):
        super().__init__(dataset_name, output_dir)
        for key in ("panoptic_json", "panoptic_root"):
            if not hasattr(self._metadata, key):
                raise ValueError(f"dataset {dataset_name!r} has no '{key}': PQ needs a panoptic dataset")
        self.backend = pq_backend(backend)

    def process(self, inputs, outputs):
        for item, output in zip(inputs, outputs):
            ids, segments = output["panoptic_seg"]
            with io.BytesIO() as png:
                Image.fromarray(id_to_rgb(ids.cpu().numpy())).save(png, format="PNG")
                encoded = png.getvalue()
            self._predictions.append(
                {
                    "image_id": item["image_id"],
                    "file_name": os.path.splitext(os.path.basename(item["file_name"]))[0] + ".png",
                    "png_string": encoded,
                    "segments_info": [self._convert_category_id(dict(s)) for s in segments],
                }
            )

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        if not comm.is_main_process():
            return None
        gt_json, gt_folder = self._metadata.panoptic_json, self._metadata.panoptic_root
        with tempfile.TemporaryDirectory(prefix="panoptic_eval") as prediction_dir:
            for prediction in predictions:
                with open(os.path.join(prediction_dir, prediction["file_name"]), "wb") as handle:
                    handle.write(prediction["png_string"])
            with open(gt_json) as handle:
                content = json.load(handle)
            content["annotations"] = [{k: v for k, v in p.items() if k != "png_string"} for p in predictions]
            predictions_json = os.path.join(self._output_dir or prediction_dir, "predictions.json")
            with open(predictions_json, "w") as handle:
                json.dump(content, handle)
            with contextlib.redirect_stdout(io.StringIO()):
                pq = _pq_compute(self.backend)(
                    gt_json, predictions_json, gt_folder=gt_folder, pred_folder=prediction_dir
                )
        metrics = OrderedDict()
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                metrics[key.upper() + suffix] = 100 * pq[group][key]
        logger.info(f"PQ ({self.backend}): " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return OrderedDict({"panoptic_seg": metrics})


def build_segmentation_evaluators(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """COCO AP (instances), PQ and mIoU for the tasks MODEL.DI_MASKDINO.TEST turns on, in one
    DatasetEvaluators; None when only instance inference is on."""
    t = cfg.MODEL.DI_MASKDINO.TEST
    if not (t.PANOPTIC_ON or t.SEMANTIC_ON):
        return None
    metadata = MetadataCatalog.get(dataset_name)
    evaluators = []
    if t.INSTANCE_ON:
        if not hasattr(metadata, "json_file"):
            raise ValueError(
                f"dataset {dataset_name!r} has no instance annotations ('json_file') for box / mask AP: set "
                "MODEL.DI_MASKDINO.TEST.INSTANCE_ON False, or register it with its instances JSON"
            )
        evaluators.append(InstanceEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder))
    if t.PANOPTIC_ON:
        evaluators.append(PanopticEvaluator(dataset_name, output_folder))
    if t.SEMANTIC_ON:
        try:
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        except KeyError as error:  # records without "sem_seg_file_name"
            raise ValueError(
                f"dataset {dataset_name!r} has no semantic maps ('sem_seg_file_name') for mIoU: evaluate on a dataset "
                "with them (e.g. coco_2017_val_panoptic_with_sem_seg) or set MODEL.DI_MASKDINO.TEST.SEMANTIC_ON False"
            ) from error
    return DatasetEvaluators(evaluators)

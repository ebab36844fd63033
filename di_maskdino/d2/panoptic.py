"""The detectron2 side of panoptic and semantic segmentation: the inference settings of
MODEL.DI_MASKDINO.TEST, the model's outputs as detectron2 results ("instances",
"panoptic_seg", "sem_seg"), their evaluators (COCO AP, PQ, mIoU in one pass) and the
per-layer evaluation of the imbalance analysis.

PQ is computed with panopticapi (installed from its repository, see README) or, where it is
absent, with hotcoco (PyPI), whose PQ equals panopticapi's (tests/d2/test_panoptic.py).
"""

import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from PIL import Image

from ..data.panoptic import id_to_rgb
from ..modeling.panoptic import SegmentationInference
from .evaluation import InstanceEvaluator
from .layer_evaluation import evaluate_outputs

__all__ = [
    "build_segmentation_inference",
    "class_names",
    "labels_index_every_class",
    "segmentation_results",
    "PanopticEvaluator",
    "pq_backend",
    "build_segmentation_evaluators",
    "evaluate_every_layer_segmentation",
]

logger = logging.getLogger(__name__)

PQ_BACKENDS = ("panopticapi", "hotcoco")
_NO_PQ_BACKEND = (
    "PQ needs panopticapi or hotcoco. Install panopticapi from its repository, as detectron2: "
    "pip install git+https://github.com/cocodataset/panopticapi.git (or pip install PATH/TO/panopticapi for a "
    "local checkout), or: pip install hotcoco"
)


def _metadata_dataset(cfg) -> Optional[str]:
    """The dataset whose metadata describes the model's classes: DATASETS.TEST[0], else
    DATASETS.TRAIN[0]."""
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return names[0] if names else None


def labels_index_every_class(cfg) -> bool:
    """Whether the model's labels index things and stuff (a panoptic / semantic model:
    MODEL.DI_MASKDINO.TEST.PANOPTIC_ON or SEMANTIC_ON), named by the dataset's
    "stuff_classes", rather than things only ("thing_classes")."""
    t = cfg.MODEL.DI_MASKDINO.TEST
    return bool(t.PANOPTIC_ON or t.SEMANTIC_ON)


def class_names(cfg) -> List[str]:
    """The names of the model's labels, in label order (see `labels_index_every_class`), from
    the dataset of DATASETS.TEST (else TRAIN); [] without a dataset."""
    name = _metadata_dataset(cfg)
    if name is None:
        return []
    key = "stuff_classes" if labels_index_every_class(cfg) else "thing_classes"
    return list(MetadataCatalog.get(name).get(key, None) or [])


def build_segmentation_inference(cfg) -> Optional[SegmentationInference]:
    """The panoptic / semantic inference MODEL.DI_MASKDINO.TEST asks for, or None when only
    instance inference is on (the model then gives instances exactly as before).

    Which classes are things comes from the metadata of the first dataset of DATASETS.TEST
    (else DATASETS.TRAIN): its "thing_dataset_id_to_contiguous_id" (none: every class is
    stuff, as in ADE20K's semantic split); its "stuff_classes" must list NUM_CLASSES classes.
    """
    t = cfg.MODEL.DI_MASKDINO.TEST
    instance, panoptic, semantic = t.INSTANCE_ON, t.PANOPTIC_ON, t.SEMANTIC_ON
    object_mask_threshold, overlap_threshold, temperature = t.OBJECT_MASK_THRESHOLD, t.OVERLAP_THRESHOLD, t.TEMPERATURE
    if not (instance or panoptic or semantic):
        raise ValueError("MODEL.DI_MASKDINO.TEST: turn on at least one of INSTANCE_ON, PANOPTIC_ON, SEMANTIC_ON")
    if temperature < 0:
        raise ValueError(f"MODEL.DI_MASKDINO.TEST.TEMPERATURE must be >= 0 (0: no sharpening), got {temperature}")
    if not (panoptic or semantic):
        return None
    num_classes = cfg.MODEL.DI_MASKDINO.NUM_CLASSES
    name = _metadata_dataset(cfg)
    if name is None:
        raise ValueError(
            "panoptic / semantic inference needs a dataset in DATASETS.TEST or DATASETS.TRAIN whose metadata says "
            "which classes are things"
        )
    metadata = MetadataCatalog.get(name)
    classes = getattr(metadata, "stuff_classes", None)
    if classes is None:
        raise ValueError(
            f"dataset {name!r} has no 'stuff_classes': panoptic / semantic inference needs a panoptic or semantic "
            "dataset (e.g. coco_2017_val_panoptic_with_sem_seg, ade20k_sem_seg_val)"
        )
    if len(classes) != num_classes:
        raise ValueError(
            f"dataset {name!r} has {len(classes)} classes but MODEL.DI_MASKDINO.NUM_CLASSES is {num_classes}"
        )
    is_thing = torch.zeros(num_classes, dtype=torch.bool)
    for index in getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values():
        is_thing[index] = True
    return SegmentationInference(
        is_thing,
        instance=instance,
        panoptic=panoptic,
        semantic=semantic,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        temperature=temperature if temperature > 0 else None,
        topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def segmentation_results(model, inference: SegmentationInference, prediction, batched_inputs, sizes, padded_size):
    """[{"instances", "panoptic_seg": (ids (H, W) int32, segments_info), "sem_seg": (K, H, W)}]
    of one output of `model` (a DIMaskDINOArch), each present when its task is on, at each
    input's "height" x "width". Instances are the model's own (things only when the classes
    include stuff); outputs without masks give instances only."""
    results = [{} for _ in batched_inputs]
    if inference.instance:
        results = model.detectron2_results(prediction, batched_inputs, sizes, padded_size)
        if inference.has_stuff:
            for result in results:
                instances = result["instances"]
                result["instances"] = instances[
                    inference.is_thing.to(instances.pred_classes.device)[instances.pred_classes]
                ]
    if prediction.masks is None:
        return results
    output_sizes = [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, sizes)]
    for index, result in enumerate(results):
        found = inference.segmentation(
            prediction.logits[index],
            prediction.masks[index],
            tuple(sizes[index]),
            tuple(padded_size),
            output_sizes[index],
        )
        if found.panoptic is not None:
            segments = [
                {"id": s.id, "category_id": s.category_id, "isthing": s.isthing} for s in found.panoptic.segments
            ]
            result["panoptic_seg"] = (found.panoptic.ids, segments)
        if found.semantic is not None:
            result["sem_seg"] = found.semantic
    return results


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


@torch.no_grad()
def evaluate_every_layer_segmentation(model, data_loader, dataset_name: str) -> "OrderedDict[str, Dict[str, float]]":
    """The imbalance question asked of panoptic / semantic segmentation: per supervised
    output ("layer 0" the initial prediction, ..., "TI s.i" the token-interaction outputs)
    box AP of things ("bbox"), mask AP ("segm"), PQ / PQ_th / PQ_st and mIoU where their
    tasks are on (outputs without masks: box AP only). `model` is a DIMaskDINOArch with
    panoptic or semantic inference."""
    inference = model.segmentation
    if inference is None:
        raise ValueError("evaluate_every_layer_segmentation needs MODEL.DI_MASKDINO.TEST.PANOPTIC_ON or SEMANTIC_ON")

    def make_evaluators(prediction):
        parts, with_masks = [], prediction.masks is not None
        if inference.instance:
            tasks = ("bbox", "segm") if with_masks else ("bbox",)
            parts.append(COCOEvaluator(dataset_name, tasks=tasks, output_dir=None))
        if with_masks and inference.panoptic:
            parts.append(PanopticEvaluator(dataset_name))
        if with_masks and inference.semantic:
            parts.append(SemSegEvaluator(dataset_name, distributed=True))
        return parts

    def results(prediction, inputs, sizes, padded):
        return segmentation_results(model, inference, prediction, inputs, sizes, padded)

    table = OrderedDict()
    for name, parts in evaluate_outputs(model, data_loader, make_evaluators, results).items():
        row = {}
        for metrics in parts:
            for task in ("bbox", "segm"):
                if task in metrics:
                    row[task] = float(metrics[task]["AP"])
            if "panoptic_seg" in metrics:
                row.update({k: float(metrics["panoptic_seg"][k]) for k in ("PQ", "PQ_th", "PQ_st")})
            if "sem_seg" in metrics:
                row["mIoU"] = float(metrics["sem_seg"]["mIoU"])
        table[name] = row
    return table

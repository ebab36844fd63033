"""Datasets in COCO's panoptic format (with semantic maps), registered with checks.

`register_coco_panoptic_checked(name, ...)` registers any dataset in COCO's panoptic format,
with a clear error when a file or folder is missing.

Contiguous class indices follow the order of the categories (COCO: detectron2's
COCO_CATEGORIES, things 0-79 then stuff 80-132, the indices of MaskDINO's release);
"thing_classes" lists the things only (COCO instance evaluation needs 80 names),
"stuff_classes" every class (semantic evaluation).
"""

import os
from typing import Dict, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .checks import DatasetError, read_coco_json

__all__ = ["register_coco_panoptic_checked", "panoptic_metadata"]


def panoptic_metadata(categories: Sequence[Dict]) -> Dict:
    """detectron2 metadata of a panoptic class list ({"id", "name", "isthing"[, "color"]};
    contiguous index = position in the list)."""
    metadata = {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
    if all("color" in c for c in categories):
        metadata["thing_colors"] = [list(c["color"]) for c in categories if c["isthing"]]
        metadata["stuff_colors"] = [list(c["color"]) for c in categories]
    return metadata


def _load_panoptic(name, panoptic_json, image_root, panoptic_root, sem_seg_root, metadata, how_to_create) -> List[Dict]:
    for path, what in ((panoptic_json, "annotation file"), (image_root, "image folder"), (panoptic_root, "PNG folder")):
        if not os.path.exists(path):
            raise DatasetError(f"dataset {name!r}: panoptic {what} {path} does not exist. {how_to_create}")
    content = read_coco_json(panoptic_json, name, "panoptic")
    things = metadata["thing_dataset_id_to_contiguous_id"]
    classes = metadata["stuff_dataset_id_to_contiguous_id"]
    images = {image["id"]: image for image in content["images"]}
    records = []
    for annotation in content["annotations"]:
        image = images[annotation["image_id"]]
        segments = []
        for segment in annotation["segments_info"]:
            if segment["category_id"] not in classes:
                raise DatasetError(
                    f"dataset {name!r}: category {segment['category_id']} of image {image['id']} is not among the "
                    "registered categories"
                )
            segments.append(
                {
                    **segment,
                    "category_id": classes[segment["category_id"]],
                    "isthing": segment["category_id"] in things,
                }
            )
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image["id"],
            "height": image["height"],
            "width": image["width"],
            "pan_seg_file_name": os.path.join(panoptic_root, annotation["file_name"]),
            "segments_info": segments,
        }
        if sem_seg_root:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, annotation["file_name"])
        records.append(record)
    if records and sem_seg_root and not os.path.isfile(records[0]["sem_seg_file_name"]):
        raise DatasetError(
            f"dataset {name!r}: semantic map {records[0]['sem_seg_file_name']} does not exist. {how_to_create}"
        )
    return records


def register_coco_panoptic_checked(
    name: str,
    *,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    categories: Sequence[Dict],
    sem_seg_root: str = "",
    instances_json: str = "",
    how_to_create: str = "",
) -> None:
    """Registers a dataset in COCO's panoptic format under `name`.

    categories: {"id", "name", "isthing"[, "color"]} in the order of the contiguous class
    indices. sem_seg_root: folder of semantic maps named like the panoptic PNGs (needed for
    semantic evaluation). instances_json: COCO instance annotations of the things (needed
    for box / mask AP)."""
    if name in DatasetCatalog.list():
        raise DatasetError(f"a dataset named {name!r} is already registered")
    metadata = panoptic_metadata(categories)
    DatasetCatalog.register(
        name,
        lambda: _load_panoptic(name, panoptic_json, image_root, panoptic_root, sem_seg_root, metadata, how_to_create),
    )
    # what detectron2's panoptic and semantic evaluators read (ids are category * 1000 + instance)
    fields = dict(metadata, evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000)
    fields.update(image_root=image_root, panoptic_root=panoptic_root, panoptic_json=panoptic_json)
    optional = {"sem_seg_root": sem_seg_root, "json_file": instances_json}
    fields.update({key: value for key, value in optional.items() if value})
    MetadataCatalog.get(name).set(**fields)

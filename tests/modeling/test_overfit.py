"""Proof that the model learns: a small DI-MaskDINO (DI and BATO on) trained from scratch on
four synthetic images reaches box and mask AP >= 0.9 on them, measured by pycocotools."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from di_maskdino.modeling import Architecture, BATOSpec, DeImbalanceSpec, DenoisingSpec, EncoderSpec, build_model
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher
from di_maskdino.synthetic import SHAPE_CLASSES, render_scene

from .tiny import TinyBackbone

SIZE = 96
ITERATIONS = 300


def overfit_model(**overrides):
    dim = 64
    architecture = Architecture(
        num_classes=len(SHAPE_CLASSES),
        hidden_dim=dim,
        mask_dim=dim,
        num_heads=4,
        ffn_dim=2 * dim,
        num_queries=10,
        num_decoder_layers=3,
        num_groups=8,
        encoder=EncoderSpec(num_layers=2, ffn_dim=2 * dim),
        de_imbalance=DeImbalanceSpec(selection_sizes=(20, 10), token_interaction_layers=1),
        bato=BATOSpec(num_guiding_tokens=5),
        denoising=DenoisingSpec(num_queries=20),
        **overrides,
    )
    backbone = TinyBackbone(channels=(32, 64, 96, 128), deep=True)
    return build_model(architecture, backbone, pixel_mean=(20.0, 20.0, 20.0), pixel_std=(60.0, 60.0, 60.0))


def scenes_and_targets(count):
    rng = np.random.default_rng(1)
    scenes = [render_scene(rng, SIZE, SIZE, 3) for _ in range(count)]
    targets = []
    for _, masks, labels in scenes:
        boxes = []
        for mask in masks:
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes.append([(x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE])
        targets.append(
            dict(
                labels=torch.tensor(labels),
                boxes=torch.tensor(boxes, dtype=torch.float32),
                masks=torch.from_numpy(masks).float(),
            )
        )
    return scenes, targets


def rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def coco_ap(scenes, results, kinds=("bbox", "segm")):
    """pycocotools box and mask AP@[.5:.95] ("bbox", "segm") and AP75 ("bbox75", "segm75") of
    `results` (Detections per image)."""
    ground_truth = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SHAPE_CLASSES)],
    }
    detections = []
    for image_id, ((_, masks, labels), result) in enumerate(zip(scenes, results), start=1):
        ground_truth["images"].append({"id": image_id, "height": SIZE, "width": SIZE})
        for mask, label in zip(masks, labels):
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
            ground_truth["annotations"].append(
                {
                    "id": len(ground_truth["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "segmentation": rle(mask),
                    "area": float(mask.sum()),
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
        masks = result.masks.numpy() if result.masks is not None else [None] * len(result)
        boxes = result.boxes.tolist()
        for score, label, box, mask in zip(result.scores.tolist(), result.labels.tolist(), boxes, masks):
            detection = {
                "image_id": image_id,
                "category_id": label + 1,
                "score": score,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            }
            if mask is not None:
                detection["segmentation"] = rle(mask)
            detections.append(detection)
    ap = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        predictions = coco.loadRes(detections)
        for kind in kinds:
            evaluation = COCOeval(coco, predictions, kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            ap[kind] = float(evaluation.stats[0])
            ap[kind + "75"] = float(evaluation.stats[2])
    return ap


def train(model, images, targets, iterations=ITERATIONS):
    criterion = SetCriterion(HungarianMatcher(num_points=1024), num_points=1024).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    batch, _ = model.preprocess(images)
    model.train()
    for _ in range(iterations):
        losses = criterion(model(batch, targets=targets), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    model.eval()
    return losses


@pytest.mark.slow
def test_overfits_four_synthetic_images():
    torch.manual_seed(0)
    scenes, targets = scenes_and_targets(4)
    images = [torch.from_numpy(image).permute(2, 0, 1).float() for image, _, _ in scenes]
    model = overfit_model()
    model.eval()
    before = coco_ap(scenes, model.predict(images))
    assert before["bbox"] < 0.3 and before["segm"] < 0.3, before

    train(model, images, targets)
    after = coco_ap(scenes, model.predict(images))
    assert after["bbox"] >= 0.9 and after["segm"] >= 0.9, after


@pytest.mark.slow
def test_detection_only_model_overfits_boxes():
    """The mask branch off (DI and BATO on): no mask losses are charged, and box AP on the
    four training images reaches 0.9 (pycocotools, bbox only)."""
    torch.manual_seed(0)
    scenes, targets = scenes_and_targets(4)
    targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]  # no masks needed
    images = [torch.from_numpy(image).permute(2, 0, 1).float() for image, _, _ in scenes]
    model = overfit_model(mask_branch=False, mask_enhanced_boxes=False)
    assert not model.predicts_masks
    model.eval()
    before = coco_ap(scenes, model.predict(images), kinds=("bbox",))
    assert before["bbox"] < 0.3, before
    losses = train(model, images, targets)
    assert not any("mask" in key or "dice" in key for key in losses)
    found = model.predict(images)
    assert all(result.masks is None for result in found)
    after = coco_ap(scenes, found, kinds=("bbox",))
    assert after["bbox"] >= 0.9, after

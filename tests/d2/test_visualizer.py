"""Demo drawings: labels inside the image and clear of each other on small images."""

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from di_maskdino.d2.visualizer import LabelPlacingVisualizer, draw_predictions  # noqa: E402


def crowded_corners():
    """A 96 x 64 image, two overlapping objects in the bottom-right corner and two in the top-left."""
    boxes = torch.tensor([[70.0, 50, 95, 63], [72, 52, 94, 62], [0, 0, 10, 8], [2, 1, 12, 9]])
    instances = Instances((64, 96))
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    instances.pred_classes = torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 64, 96, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = True
    instances.pred_masks = masks
    metadata = MetadataCatalog.get("__test_visualization").set(thing_classes=["rectangle", "ellipse", "triangle"])
    return np.zeros((64, 96, 3), np.uint8), instances, metadata


def label_extents(visualizer_class, scale=8):
    image, instances, metadata = crowded_corners()
    output = visualizer_class(image, metadata, scale=scale).draw_instance_predictions(instances)
    renderer = output.canvas.get_renderer()
    extents = [t.get_window_extent(renderer=renderer) for t in output.ax.texts]
    return extents, output.canvas.get_width_height()


def inside(extent, size):
    return extent.x0 >= -0.5 and extent.y0 >= -0.5 and extent.x1 <= size[0] + 0.5 and extent.y1 <= size[1] + 0.5


def test_labels_stay_inside_and_apart():
    extents, size = label_extents(LabelPlacingVisualizer)
    assert len(extents) == 4
    assert all(inside(e, size) for e in extents)
    for a, b in itertools.combinations(extents, 2):
        assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1)
    # detectron2's own placement puts a label of this scene outside the image (the test can fail)
    plain, size = label_extents(Visualizer)
    assert not all(inside(e, size) for e in plain)


def test_small_images_are_drawn_enlarged():
    image, instances, metadata = crowded_corners()
    assert draw_predictions(image, instances, metadata, min_side=512).shape == (512, 768, 3)
    assert draw_predictions(np.zeros((600, 800, 3), np.uint8), instances[:0], metadata).shape == (600, 800, 3)

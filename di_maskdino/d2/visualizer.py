"""Drawing predictions with detectron2's Visualizer, legibly on small images.

`draw_predictions(image, instances, metadata)` draws small images enlarged (the shorter side
to at least `min_side` pixels, so that labels are small relative to the objects) and keeps
every label inside the image, moved down (or up) past labels already drawn so that labels
do not cover one another.
"""

from typing import List

import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["LabelPlacingVisualizer", "draw_predictions"]


class LabelPlacingVisualizer(Visualizer):
    """detectron2's Visualizer whose labels stay inside the image and do not overlap."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._label_boxes: List[np.ndarray] = []  # (x0, y0, x1, y1) in display pixels

    def draw_text(self, text, position, *args, **kwargs):
        output = super().draw_text(text, position, *args, **kwargs)
        self._place(self.output.ax.texts[-1])
        return output

    def _extent(self, artist) -> np.ndarray:
        box = artist.get_window_extent(renderer=self.output.canvas.get_renderer())
        return np.array([box.x0, box.y0, box.x1, box.y1])

    def _place(self, artist) -> None:
        """Shifts the label into the image and off the labels drawn before it. Data
        coordinates are image pixels (y down); display coordinates are output pixels (y up)."""
        width, height = self.output.width * self.output.scale, self.output.height * self.output.scale
        to_data = 1.0 / self.output.scale
        box = self._extent(artist)
        x, y = artist.get_position()
        x += (max(0.0, -box[0]) - max(0.0, box[2] - width)) * to_data
        y += (max(0.0, box[3] - height) - max(0.0, -box[1])) * to_data
        artist.set_position((x, y))
        for direction in (1, -1):  # down the image first, then up
            start = (x, y)
            for _ in range(len(self._label_boxes)):
                box = self._extent(artist)
                hit = next((b for b in self._label_boxes if _overlap(box, b)), None)
                if hit is None:
                    self._label_boxes.append(box)
                    return
                shift = (box[3] - hit[1] + 1) if direction > 0 else -(hit[3] - box[1] + 1)
                artist.set_position((x, artist.get_position()[1] + shift * to_data))
                moved = self._extent(artist)
                if moved[1] < 0 or moved[3] > height:
                    break  # no room this way
            artist.set_position(start)
        self._label_boxes.append(self._extent(artist))  # no free place: it overlaps, inside the image


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_predictions(image: np.ndarray, instances, metadata, min_side: int = 512) -> np.ndarray:
    """(H, W, 3) uint8 RGB image with `instances` (detectron2 Instances on the CPU) drawn;
    images whose shorter side is below `min_side` come out enlarged by an integer factor."""
    scale = max(1, int(np.ceil(min_side / max(1, min(image.shape[:2])))))
    visualizer = LabelPlacingVisualizer(image, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()

"""Reading image files as the model expects them (no detectron2 needed).

`read_image_rgb` accepts what real datasets contain: grayscale, palette, RGBA, CMYK and
16-bit images, EXIF orientation. Unreadable files raise an error naming the file.
"""

import glob
import os
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image_rgb", "shortest_edge_size", "resize_image", "image_paths", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


def read_image_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of the image at `path`, upright per its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as error:
        raise ImageReadError(f"image file not found: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"cannot decode image {path} (corrupt or not an image): {error}") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit depth: scale the actual range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        return np.repeat(array.round().astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, LA, P, RGBA, CMYK, ...
    return np.asarray(image, dtype=np.uint8).copy()


def shortest_edge_size(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """(H', W') with the shorter side scaled to `min_size`, unless the longer one would then
    exceed `max_size` (then the longer side is `max_size`), rounded to the nearest integer:
    detectron2's test-time ResizeShortestEdge (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST).
    min_size 0 keeps the size."""
    if min_size <= 0:
        return height, width
    scale = min_size / min(height, width)
    new_height, new_width = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max_size > 0 and max(new_height, new_width) > max_size:
        shrink = max_size / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    return int(new_height + 0.5), int(new_width + 0.5)


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image resized to `size` (H', W') with PIL's bilinear filter, as
    detectron2 resizes uint8 images."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized)


def image_paths(patterns: Sequence[str]) -> List[str]:
    """Files, folders (their images, sorted) and glob patterns -> paths, each once; a folder
    or pattern without images raises ValueError naming it."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise ValueError(f"{pattern}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"{pattern}: no such file, folder or matching image")
            paths += matches
    return list(dict.fromkeys(paths))

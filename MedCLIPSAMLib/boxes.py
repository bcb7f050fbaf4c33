"""Bounding boxes of the connected components of a binary mask (the SAM box prompts)."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = ["boxes_from_mask"]

logger = logging.getLogger(__name__)

_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _validate_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"Invalid {name}={value!r}: use an integer >= {minimum}.")
    return int(value)


def boxes_from_mask(
    mask: np.ndarray,
    *,
    min_area: int = 0,
    max_boxes: int | None = None,
    margin: int = 0,
) -> np.ndarray:
    """Compute one bounding box per 8-connected component of a binary mask.

    Args:
        mask: ``H x W`` array; nonzero pixels are foreground (bool is typical).
        min_area: Components with fewer pixels than this are dropped (0 keeps all).
        max_boxes: Keep at most this many boxes, largest components first; None keeps all.
        margin: Pixels added on every side of each box, clipped to the image.

    Returns:
        ``[N, 4]`` int64 array of ``[x_min, y_min, x_max, y_max]`` pixel coordinates of the original image, max
        inclusive (x is the column, y the row). Sorted by component area, largest first; equal areas in row-major
        order of their first pixel (top-left first). An empty mask gives shape ``(0, 4)``. With a margin, boxes of
        different components may overlap; they are not merged.
    """
    if not isinstance(mask, np.ndarray):
        raise InvalidInputError(f"Expected a numpy array mask, got {type(mask).__name__}.")
    if mask.ndim != 2:
        raise InvalidInputError(f"Expected an HxW mask, got shape {mask.shape}.")
    min_area = _validate_count("min_area", min_area, 0)
    margin = _validate_count("margin", margin, 0)
    if max_boxes is not None:
        max_boxes = _validate_count("max_boxes", max_boxes, 0)

    foreground = mask.astype(bool)
    # Labels are numbered in row-major order of each component's first pixel, which gives the tie order.
    labels, count = ndimage.label(foreground, structure=_EIGHT_CONNECTIVITY)
    if count == 0:
        return np.zeros((0, 4), dtype=np.int64)

    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    order = sorted(range(count), key=lambda index: (-int(areas[index]), index))
    order = [index for index in order if areas[index] >= min_area]
    if max_boxes is not None:
        order = order[:max_boxes]

    height, width = mask.shape
    boxes = np.zeros((len(order), 4), dtype=np.int64)
    for row, index in enumerate(order):
        rows, columns = slices[index]
        boxes[row] = (
            max(columns.start - margin, 0),
            max(rows.start - margin, 0),
            min(columns.stop - 1 + margin, width - 1),
            min(rows.stop - 1 + margin, height - 1),
        )
    logger.debug("boxes_from_mask: %d components, %d boxes kept", count, len(order))
    return boxes

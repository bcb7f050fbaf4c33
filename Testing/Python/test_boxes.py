"""Tests of boxes_from_mask: 8-connected components to XYXY boxes with exact coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from MedCLIPSAMLib.boxes import boxes_from_mask
from MedCLIPSAMLib.errors import InvalidInputError


def _mask(height: int, width: int, *rectangles: tuple[int, int, int, int]) -> np.ndarray:
    """Build a bool mask with True on each inclusive (x_min, y_min, x_max, y_max) rectangle."""
    mask = np.zeros((height, width), dtype=bool)
    for x_min, y_min, x_max, y_max in rectangles:
        mask[y_min : y_max + 1, x_min : x_max + 1] = True
    return mask


def test_single_rectangle_exact_box():
    boxes = boxes_from_mask(_mask(20, 30, (3, 5, 10, 8)))
    assert boxes.dtype == np.int64
    assert boxes.tolist() == [[3, 5, 10, 8]]


def test_single_pixel_box():
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 4] = True
    assert boxes_from_mask(mask).tolist() == [[4, 2, 4, 2]]


def test_empty_mask_gives_no_boxes():
    boxes = boxes_from_mask(np.zeros((10, 10), dtype=bool))
    assert boxes.shape == (0, 4)
    assert boxes.dtype == np.int64


def test_sorted_largest_first():
    mask = _mask(40, 40, (0, 0, 1, 1), (10, 10, 19, 19), (30, 30, 34, 34))
    assert boxes_from_mask(mask).tolist() == [[10, 10, 19, 19], [30, 30, 34, 34], [0, 0, 1, 1]]


def test_equal_areas_in_top_left_order():
    # Equal areas: the component whose first pixel comes first in row-major order comes first.
    mask = _mask(20, 20, (2, 10, 4, 12), (15, 1, 17, 3), (8, 10, 10, 12))
    assert boxes_from_mask(mask).tolist() == [[15, 1, 17, 3], [2, 10, 4, 12], [8, 10, 10, 12]]


def test_diagonal_pixels_merge():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    mask[3, 5] = True  # separated by one column from (3, 3): its own component
    boxes = boxes_from_mask(mask)
    assert boxes.tolist() == [[1, 1, 3, 3], [5, 3, 5, 3]]


def test_concave_shape_one_box():
    mask = _mask(10, 10, (1, 1, 1, 8), (1, 8, 8, 8))  # an L shape
    assert boxes_from_mask(mask).tolist() == [[1, 1, 8, 8]]


def test_min_area_drops_small_components():
    mask = _mask(30, 30, (0, 0, 2, 2), (10, 10, 14, 14))  # areas 9 and 25
    assert boxes_from_mask(mask, min_area=10).tolist() == [[10, 10, 14, 14]]
    assert boxes_from_mask(mask, min_area=9).shape == (2, 4)
    assert boxes_from_mask(mask, min_area=26).shape == (0, 4)


def test_max_boxes_keeps_largest():
    mask = _mask(40, 40, (0, 0, 1, 1), (10, 10, 19, 19), (30, 30, 34, 34))
    assert boxes_from_mask(mask, max_boxes=2).tolist() == [[10, 10, 19, 19], [30, 30, 34, 34]]
    assert boxes_from_mask(mask, max_boxes=0).shape == (0, 4)


def test_margin_expands_and_clips_at_borders():
    mask = _mask(20, 30, (0, 1, 3, 4), (25, 15, 29, 19), (10, 8, 12, 9))
    boxes = boxes_from_mask(mask, margin=2)
    assert boxes.tolist() == [[23, 13, 29, 19], [0, 0, 5, 6], [8, 6, 14, 11]]


def test_nonbool_mask_accepted():
    mask = _mask(10, 10, (2, 3, 4, 5)).astype(np.uint8) * 255
    assert boxes_from_mask(mask).tolist() == [[2, 3, 4, 5]]


@pytest.mark.parametrize(
    "kwargs",
    [{"min_area": -1}, {"margin": -1}, {"max_boxes": -1}, {"margin": 1.5}, {"min_area": True}],
)
def test_invalid_options_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        boxes_from_mask(np.zeros((4, 4), dtype=bool), **kwargs)


def test_wrong_dimensions_rejected():
    with pytest.raises(InvalidInputError, match="HxW"):
        boxes_from_mask(np.zeros((4, 4, 3), dtype=bool))

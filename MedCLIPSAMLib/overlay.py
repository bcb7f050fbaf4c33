"""Overlay images for review: saliency heat map, mask contour and box rectangles drawn on the input image.

Uses `matplotlib.colormaps` only, never pyplot, so rendering creates no figures and touches no global state.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = ["render_overlay", "saliency_to_uint8"]

DEFAULT_COLORMAP = "jet"
DEFAULT_HEAT_ALPHA = 0.4  # weight of the heat map in the blend, 0 (image only) .. 1 (heat map only)
DEFAULT_CONTOUR_COLOR = (255, 0, 255)  # magenta mask outline: the "jet" colour map contains no magenta
DEFAULT_CONTOUR_WIDTH = 2  # pixels, inside the mask
DEFAULT_BOX_COLOR = (255, 255, 255)
DEFAULT_BOX_WIDTH = 1  # pixels


def saliency_to_uint8(saliency: np.ndarray) -> np.ndarray:
    """Convert a saliency map to 8 bits: [H, W] float in [0, 1] -> [H, W] uint8 0..255 (values clipped, NaN -> 0)."""
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.ndim != 2:
        raise InvalidInputError(f"saliency must be a 2D map (H, W), got shape {saliency.shape}.")
    saliency = np.nan_to_num(saliency, nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(saliency, 0.0, 1.0) * 255.0).astype(np.uint8)


def _mask_contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Return the inner boundary band of `mask`, `width` pixels wide ([H, W] bool)."""
    if not mask.any():
        return mask.copy()
    # border_value=0 treats pixels outside the image as background, so a mask touching the border is outlined there.
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def _draw_box(image: np.ndarray, box: np.ndarray, color: tuple[int, int, int], width: int) -> None:
    """Draw one XYXY (inclusive) rectangle outline in place, clipped to the image."""
    height, image_width = image.shape[:2]
    x_min, y_min, x_max, y_max = (int(round(value)) for value in box)
    x_min, x_max = max(x_min, 0), min(x_max, image_width - 1)
    y_min, y_max = max(y_min, 0), min(y_max, height - 1)
    if x_min > x_max or y_min > y_max:
        return
    image[y_min : min(y_min + width, y_max + 1), x_min : x_max + 1] = color
    image[max(y_max - width + 1, y_min) : y_max + 1, x_min : x_max + 1] = color
    image[y_min : y_max + 1, x_min : min(x_min + width, x_max + 1)] = color
    image[y_min : y_max + 1, max(x_max - width + 1, x_min) : x_max + 1] = color


def render_overlay(
    rgb: np.ndarray,
    saliency: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    *,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_HEAT_ALPHA,
    contour_color: tuple[int, int, int] = DEFAULT_CONTOUR_COLOR,
    contour_width: int = DEFAULT_CONTOUR_WIDTH,
    box_color: tuple[int, int, int] = DEFAULT_BOX_COLOR,
    box_width: int = DEFAULT_BOX_WIDTH,
) -> np.ndarray:
    """Render the saliency heat map, the mask outline and the boxes over an image.

    Args:
        rgb: Image [H, W, 3] uint8.
        saliency: Map [H, W] float in [0, 1], blended as a colour map with weight `alpha`; None draws no heat map.
        mask: [H, W] bool (or 0/non-zero); its inner boundary band of `contour_width` pixels is painted in
            `contour_color`. None draws no contour.
        boxes: [N, 4] XYXY pixel coordinates with inclusive maxima, drawn as `box_width`-pixel rectangles.
        colormap: Name of a matplotlib colour map ("jet", "inferno", ...).
        alpha: Heat map weight in [0, 1].

    Returns:
        New image [H, W, 3] uint8; the inputs are not modified.
    """
    from matplotlib import colormaps

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidInputError(f"rgb must be an (H, W, 3) uint8 image, got shape {rgb.shape} and dtype {rgb.dtype}.")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha must be in [0, 1], got {alpha}.")
    if contour_width < 1 or box_width < 1:
        raise InvalidInputError(
            f"contour_width and box_width must be at least 1 pixel, got {contour_width} and {box_width}."
        )
    if colormap not in colormaps:
        raise InvalidInputError(f"matplotlib has no colour map named {colormap!r}: use e.g. 'jet' or 'inferno'.")
    height, width = rgb.shape[:2]

    output = rgb.astype(np.float32)
    if saliency is not None:
        saliency = np.asarray(saliency)
        if saliency.shape != (height, width):
            raise InvalidInputError(f"saliency shape {saliency.shape} differs from the image size {(height, width)}.")
        # The lookup table is [256, 4] RGBA in [0, 1]; indexing with the 8-bit map avoids a float colour per pixel.
        lookup = colormaps[colormap](np.arange(256))[:, :3].astype(np.float32) * 255.0
        heat = lookup[saliency_to_uint8(saliency)]
        output = (1.0 - alpha) * output + alpha * heat
    output = np.clip(np.round(output), 0, 255).astype(np.uint8)

    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise InvalidInputError(f"mask shape {mask.shape} differs from the image size {(height, width)}.")
        output[_mask_contour(mask.astype(bool), contour_width)] = contour_color

    if boxes is not None:
        boxes = np.asarray(boxes)
        if boxes.size:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise InvalidInputError(f"boxes must have shape (N, 4) in XYXY order, got shape {boxes.shape}.")
            for box in boxes:
                _draw_box(output, box, box_color, box_width)
    return output

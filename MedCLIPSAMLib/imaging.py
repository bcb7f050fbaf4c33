"""Input preparation: RGB conversion with intensity windowing, letterboxing to a square and the CLIP input tensor.

Conventions used throughout:

* Images are numpy arrays indexed ``[row, column]`` (``H x W`` or ``H x W x C``), the way `MedCLIPSAMLib.io.read_image`
  returns them.
* The CLIP input is the image padded to a square of side ``max(H, W)`` and resized to ``size x size``. The image sits
  in the centre of the square; when the padding is odd, the extra pixel goes to the bottom or right side.
* Maps on the ``size x size`` grid (saliency) go back to the original pixels with `Letterbox.map_to_original`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = ["Letterbox", "clip_input", "compute_window", "to_rgb_uint8"]

logger = logging.getLogger(__name__)

DEFAULT_LOW_PERCENTILE = 0.5
"""Lower percentile (in %) of the finite values that becomes the window minimum (MedCLIP-SAM input preparation)."""

DEFAULT_HIGH_PERCENTILE = 99.5
"""Upper percentile (in %) of the finite values that becomes the window maximum."""

MIN_IMAGE_SIDE = 2
"""Smallest image side in pixels that the pipeline accepts, because a single row or column has no 2D structure."""


def compute_window(
    values: np.ndarray,
    low_pct: float = DEFAULT_LOW_PERCENTILE,
    high_pct: float = DEFAULT_HIGH_PERCENTILE,
) -> tuple[float, float]:
    """Compute an intensity window ``(minimum, maximum)`` from the percentiles of the finite values.

    Args:
        values: Array of any shape and real dtype (an image, a volume). NaN and +-inf are ignored.
        low_pct: Percentile in [0, 100] that gives the window minimum.
        high_pct: Percentile in [0, 100], greater than `low_pct`, that gives the window maximum.

    Returns:
        ``(minimum, maximum)`` as Python floats with ``minimum < maximum``. The two percentiles can be equal on
        an image that is not constant, for example a small bright object covering less than 0.5 % of a flat
        image. The window then falls back to the minimum and maximum of the finite values.

    Raises:
        InvalidInputError: When the percentiles are invalid, the array has no finite value, or all finite values
            are equal (a constant image has no contrast to window).
    """
    if not (0.0 <= low_pct < high_pct <= 100.0):
        raise InvalidInputError(
            f"Invalid window percentiles low_pct={low_pct}, high_pct={high_pct}: "
            "use 0 <= low_pct < high_pct <= 100."
        )
    array = np.asarray(values)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidInputError(f"Cannot compute an intensity window of dtype {array.dtype}: use a real-valued array.")

    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array.ravel()
    if finite.size == 0:
        raise InvalidInputError(
            f"Image of shape {array.shape} is unusable, no contrast: it has no finite values (all NaN or infinite)."
        )

    finite = finite.astype(np.float64, copy=False)
    low, high = np.percentile(finite, [low_pct, high_pct])
    if not high > low:
        low, high = float(finite.min()), float(finite.max())
    if not high > low:
        raise InvalidInputError(
            f"Image of shape {array.shape} is unusable, no contrast: every finite value equals {low:g}. "
            "Pass an explicit window if a constant image is intended."
        )
    return float(low), float(high)


def _validate_image_shape(image: np.ndarray) -> None:
    if image.ndim not in (2, 3):
        raise InvalidInputError(
            f"Expected a 2D image of shape HxW or HxWxC, got an array of shape {image.shape}. "
            "For a volume, pass one slice at a time."
        )
    if image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4):
        raise InvalidInputError(
            f"Expected 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels in the last axis, "
            f"got shape {image.shape}."
        )
    height, width = image.shape[:2]
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise InvalidInputError(
            f"Image of shape {image.shape} is too small: each side needs at least {MIN_IMAGE_SIDE} pixels."
        )


def _drop_alpha(image: np.ndarray) -> np.ndarray:
    """Return the colour channels as HxW (gray) or HxWx3. Alpha is dropped, not composited."""
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels in (1, 2):
        return image[:, :, 0]
    return image[:, :, :3]


def _replicate_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def to_rgb_uint8(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Convert an image as read from disk into the RGB uint8 image that CLIP, the CRF and SAM use.

    * uint8 images are used as they are: gray is replicated to three channels and alpha is dropped (not
      composited). `window` is ignored for uint8 input.
    * bool images become 0 (False) and 255 (True).
    * Every other real dtype (uint16, int16, float: CT, MR, 16-bit X-ray) is converted to float64 and windowed:
      values are mapped linearly from ``[minimum, maximum]`` to ``[0, 255]``, clipped and rounded. The window is
      `window` when given, else `compute_window` of the finite values (0.5 and 99.5 percentiles). NaN and +-inf
      become the window minimum (0). Colour images are windowed with one window for all channels.

    Args:
        image: ``H x W``, ``H x W x 1``, ``H x W x 2`` (gray + alpha), ``H x W x 3`` or ``H x W x 4`` array with
            ``H, W >= 2``.
        window: Optional ``(minimum, maximum)`` in the image's intensity units, finite, minimum < maximum.

    Returns:
        ``H x W x 3`` uint8 array, C-contiguous, never a view of `image`.

    Raises:
        InvalidInputError: For a wrong shape, an unsupported dtype, an invalid window, or a constant or all
            non-finite image without a window ("unusable, no contrast").
    """
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"Expected a numpy array image, got {type(image).__name__}.")
    _validate_image_shape(image)
    if window is not None:
        window = _validate_window(window)

    colour = _drop_alpha(image)
    if colour.dtype == np.uint8:
        return np.ascontiguousarray(_replicate_gray(colour)).copy()
    if colour.dtype == bool:
        return np.ascontiguousarray(_replicate_gray(colour.astype(np.uint8) * 255))
    if not (np.issubdtype(colour.dtype, np.integer) or np.issubdtype(colour.dtype, np.floating)):
        raise InvalidInputError(
            f"Unsupported image dtype {colour.dtype}: expected uint8, bool, an integer or a floating point type."
        )

    low, high = window if window is not None else compute_window(colour)
    values = colour.astype(np.float64)
    values[~np.isfinite(values)] = low
    scaled = (values - low) * (255.0 / (high - low))
    rgb = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    return np.ascontiguousarray(_replicate_gray(rgb))


def _validate_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"Invalid window {window!r}: expected two numbers (minimum, maximum).") from error
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InvalidInputError(
            f"Invalid window ({low:g}, {high:g}): expected finite values with minimum < maximum."
        )
    return low, high


@dataclass(frozen=True)
class Letterbox:
    """Geometry of the pad-to-square and resize step that produced a CLIP input tensor.

    The original ``H x W`` image occupies rows ``pad_top .. pad_top + H - 1`` and columns
    ``pad_left .. pad_left + W - 1`` of a ``side x side`` square (``side = max(H, W)``), which is then resized to
    ``size x size``.
    """

    original_hw: tuple[int, int]
    side: int
    pad_top: int
    pad_left: int
    size: int = 224

    @classmethod
    def for_shape(cls, height: int, width: int, size: int = 224) -> Letterbox:
        """Build the centred letterbox of a ``height x width`` image. Odd padding puts the extra pixel last."""
        side = max(height, width)
        return cls(
            original_hw=(int(height), int(width)),
            side=int(side),
            pad_top=(side - height) // 2,
            pad_left=(side - width) // 2,
            size=int(size),
        )

    @property
    def scale(self) -> float:
        """Size of one original pixel on the ``size x size`` grid, in grid pixels."""
        return self.size / self.side

    def _sample_positions(self, pad: int, length: int) -> np.ndarray:
        """Return the grid coordinates (pixel index units) of the centres of `length` original pixels.

        Half-pixel-centre convention, as torch ``interpolate(align_corners=False)``: original pixel ``j`` has its
        centre at ``(pad + j + 0.5) * scale - 0.5`` in grid index units. The positions are clamped to the grid
        pixels whose centres lie inside the image area, so that padding never blends into border pixels.
        """
        scale = self.scale
        positions = (pad + np.arange(length, dtype=np.float64) + 0.5) * scale - 0.5
        first = math.ceil(pad * scale - 0.5)
        last = math.floor((pad + length) * scale - 0.5)
        first = min(max(first, 0), self.size - 1)
        last = min(max(last, 0), self.size - 1)
        if first > last:
            # The image area is thinner than one grid pixel: use the grid pixel that contains its centre.
            centre = min(max(int((pad + length / 2.0) * scale), 0), self.size - 1)
            first = last = centre
        return np.clip(positions, first, last)

    def map_to_original(self, square_map: np.ndarray) -> np.ndarray:
        """Map a ``size x size`` map (for example a saliency map) back onto the original ``H x W`` pixels.

        The map is sampled bilinearly at the centre of every original pixel. Inside the image this equals resizing
        the map to ``side x side`` (bilinear, half-pixel centres, no antialiasing) and cropping the padding. At the
        border, samples are clamped to the image area, so values on the padding never leak into border pixels.

        Args:
            square_map: ``size x size`` array of any real dtype, indexed ``[row, column]``.

        Returns:
            ``H x W`` float32 array. Values stay within the range of the input (bilinear weights are convex).
        """
        square = np.asarray(square_map)
        if square.shape != (self.size, self.size):
            raise InvalidInputError(
                f"Expected a {self.size}x{self.size} map to map back, got shape {square.shape}."
            )
        square = square.astype(np.float64, copy=False)
        height, width = self.original_hw

        rows = self._sample_positions(self.pad_top, height)
        columns = self._sample_positions(self.pad_left, width)
        row0 = np.floor(rows).astype(np.int64)
        column0 = np.floor(columns).astype(np.int64)
        row1 = np.minimum(row0 + 1, self.size - 1)
        column1 = np.minimum(column0 + 1, self.size - 1)
        row_weight = (rows - row0)[:, None]
        column_weight = (columns - column0)[None, :]

        # Interpolate along rows first (H x size), then along columns (H x W).
        along_rows = square[row0] * (1.0 - row_weight) + square[row1] * row_weight
        result = along_rows[:, column0] * (1.0 - column_weight) + along_rows[:, column1] * column_weight
        return result.astype(np.float32)


def clip_input(
    rgb: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    size: int = 224,
) -> tuple[torch.Tensor, Letterbox]:
    """Build the normalised CLIP input tensor of an RGB image, letterboxed to a square.

    Steps:

    1. Scale to [0, 1].
    2. Pad to a centred ``side x side`` square with the normalisation mean, so the padding is 0 after normalising.
    3. Resize to ``size x size`` with torch bicubic interpolation (``align_corners=False``, with antialiasing as
       PIL does when shrinking) and clamp to [0, 1], because bicubic kernels overshoot at edges.
    4. Subtract `mean` and divide by `std` per channel.

    Args:
        rgb: ``H x W x 3`` uint8 image (see `to_rgb_uint8`), ``H, W >= 2``.
        mean: Per-channel normalisation mean on the [0, 1] scale (RGB order).
        std: Per-channel normalisation standard deviation on the [0, 1] scale, all positive.
        size: Side of the square CLIP input in pixels (224 for BiomedCLIP).

    Returns:
        ``(tensor, letterbox)``: a float32 CPU tensor of shape ``[1, 3, size, size]`` (batch, RGB channel, row,
        column) and the `Letterbox` that maps ``size x size`` maps back onto the original pixels.
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        description = f"shape {rgb.shape}, dtype {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InvalidInputError(f"Expected an HxWx3 uint8 RGB image, got {description}. Use to_rgb_uint8 first.")
    _validate_image_shape(rgb)
    if len(mean) != 3 or len(std) != 3:
        raise InvalidInputError(f"Expected 3 mean and 3 std values, got mean={mean!r}, std={std!r}.")
    if not all(float(value) > 0 for value in std):
        raise InvalidInputError(f"Invalid std {std!r}: every value must be positive.")
    if int(size) < 1:
        raise InvalidInputError(f"Invalid CLIP input size {size}: use a positive number of pixels.")

    height, width = rgb.shape[:2]
    letterbox = Letterbox.for_shape(height, width, size)
    mean_tensor = torch.tensor([float(value) for value in mean], dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor([float(value) for value in std], dtype=torch.float32).view(3, 1, 1)

    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float32) / 255.0
    square = mean_tensor.expand(3, letterbox.side, letterbox.side).clone()
    square[:, letterbox.pad_top : letterbox.pad_top + height, letterbox.pad_left : letterbox.pad_left + width] = image

    if letterbox.side != size:
        square = F.interpolate(
            square[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
        )[0].clamp_(0.0, 1.0)
    tensor = ((square - mean_tensor) / std_tensor)[None].contiguous()
    return tensor, letterbox

"""Dense CRF (fully connected, Gaussian pairwise kernels, mean-field inference) that turns a saliency map into the
coarse binary mask.

Two labels (0 background, 1 foreground) on the image's own pixel grid. The unary energies come from the saliency map
itself, with the temperature-scaled form of MedCLIP-SAM. The pairwise terms are pydensecrf's Gaussian (smoothness)
and bilateral (appearance) kernels on the prepared RGB image.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = ["crf_refine", "unary_energies"]

logger = logging.getLogger(__name__)

DEFAULT_TAU = 1.05
"""Temperature of the unary energies (MedCLIP-SAM)."""

UNARY_EPS = 1e-8
"""Added inside the logarithms of the unary energies so that saliency 0 or 1 gives a finite energy."""

DEFAULT_GAUSSIAN_SXY = 3.0
"""Spatial standard deviation of the Gaussian (smoothness) kernel, in pixels."""

DEFAULT_GAUSSIAN_COMPAT = 3.0
"""Potts weight of the Gaussian kernel."""

DEFAULT_BILATERAL_SXY = 60.0
"""Spatial standard deviation of the bilateral (appearance) kernel, in pixels."""

DEFAULT_BILATERAL_SRGB = 5.0
"""Colour standard deviation of the bilateral kernel, in 0..255 intensity units."""

DEFAULT_BILATERAL_COMPAT = 5.0
"""Potts weight of the bilateral kernel."""

DEFAULT_ITERATIONS = 1
"""Mean-field iterations (MedCLIP-SAM uses one)."""


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def unary_energies(saliency: np.ndarray, *, tau: float = DEFAULT_TAU, eps: float = UNARY_EPS) -> np.ndarray:
    """Compute the unary energies (negative log-probabilities) of the two labels from a saliency map.

    With ``sig`` the logistic function: background ``-ln(1 - s + eps) / (tau * sig(1 - s))``, foreground
    ``-ln(s + eps) / (tau * sig(s))``.

    Args:
        saliency: ``H x W`` array with values in [0, 1] (not checked here; `crf_refine` validates).
        tau: Temperature, positive; the energies scale with ``1 / tau``.
        eps: Positive constant inside the logarithms.

    Returns:
        ``(2, H * W)`` float32 C-contiguous array: row 0 background, row 1 foreground, pixels in row-major order.
    """
    s = np.asarray(saliency, dtype=np.float64).reshape(-1)
    background = -np.log(1.0 - s + eps) / (tau * _sigmoid(1.0 - s))
    foreground = -np.log(s + eps) / (tau * _sigmoid(s))
    return np.ascontiguousarray(np.stack([background, foreground]).astype(np.float32))


def _validate_number(name: str, value: float, *, allow_zero: bool = False) -> float:
    expected = "a non-negative" if allow_zero else "a positive"
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"Invalid {name}={value!r}: expected {expected} number.") from error
    if not np.isfinite(number) or number < 0.0 or (number == 0.0 and not allow_zero):
        raise InvalidInputError(f"Invalid {name}={value!r}: expected {expected} finite number.")
    return number


def crf_refine(
    rgb: np.ndarray,
    saliency: np.ndarray,
    *,
    tau: float = DEFAULT_TAU,
    gaussian_sxy: float = DEFAULT_GAUSSIAN_SXY,
    gaussian_compat: float = DEFAULT_GAUSSIAN_COMPAT,
    bilateral_sxy: float = DEFAULT_BILATERAL_SXY,
    bilateral_srgb: float = DEFAULT_BILATERAL_SRGB,
    bilateral_compat: float = DEFAULT_BILATERAL_COMPAT,
    iterations: int = DEFAULT_ITERATIONS,
) -> np.ndarray:
    """Refine a saliency map into a binary mask with a two-label dense CRF.

    Args:
        rgb: ``H x W x 3`` uint8 image that the saliency belongs to (`MedCLIPSAMLib.imaging.to_rgb_uint8`).
            Read-only and non-contiguous arrays are fine: the function passes pydensecrf a fresh copy.
        saliency: ``H x W`` real array in [0, 1] on the same pixels. NaN or infinite values raise; finite values
            outside [0, 1] are clipped with a warning.
        tau: Unary temperature (see `unary_energies`), positive.
        gaussian_sxy, gaussian_compat: Gaussian kernel standard deviation (pixels, positive) and Potts weight
            (>= 0; 0 switches the kernel off).
        bilateral_sxy, bilateral_srgb, bilateral_compat: Bilateral kernel spatial (pixels) and colour (0..255)
            standard deviations (positive) and Potts weight (>= 0; 0 switches the kernel off).
        iterations: Mean-field iterations, >= 1.

    Returns:
        ``H x W`` bool mask, True for foreground (label 1 has the larger marginal; ties go to background).
    """
    import pydensecrf.densecrf as dcrf

    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        description = f"shape {rgb.shape}, dtype {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InvalidInputError(f"Expected an HxWx3 uint8 RGB image for the CRF, got {description}.")
    saliency_array = np.asarray(saliency)
    if saliency_array.shape != rgb.shape[:2]:
        raise InvalidInputError(
            f"Saliency shape {saliency_array.shape} does not match the image size {rgb.shape[:2]}: "
            "map the saliency back onto the image first."
        )
    if not (np.issubdtype(saliency_array.dtype, np.floating) or np.issubdtype(saliency_array.dtype, np.integer)
            or saliency_array.dtype == bool):
        raise InvalidInputError(f"Expected a real-valued saliency map, got dtype {saliency_array.dtype}.")
    saliency_array = saliency_array.astype(np.float64)
    if not np.isfinite(saliency_array).all():
        raise InvalidInputError("The saliency map contains NaN or infinite values.")
    if saliency_array.size and (saliency_array.min() < 0.0 or saliency_array.max() > 1.0):
        message = (
            f"Saliency values span [{saliency_array.min():g}, {saliency_array.max():g}], outside [0, 1]; "
            "clipping them to [0, 1]."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
        saliency_array = np.clip(saliency_array, 0.0, 1.0)

    tau = _validate_number("tau", tau)
    gaussian_sxy = _validate_number("gaussian_sxy", gaussian_sxy)
    gaussian_compat = _validate_number("gaussian_compat", gaussian_compat, allow_zero=True)
    bilateral_sxy = _validate_number("bilateral_sxy", bilateral_sxy)
    bilateral_srgb = _validate_number("bilateral_srgb", bilateral_srgb)
    bilateral_compat = _validate_number("bilateral_compat", bilateral_compat, allow_zero=True)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InvalidInputError(f"Invalid iterations={iterations!r}: use a positive integer.")

    height, width = saliency_array.shape
    # pydensecrf rejects read-only buffers: hand it fresh C-contiguous copies.
    unary = np.array(unary_energies(saliency_array, tau=tau), dtype=np.float32, order="C", copy=True)
    image = np.array(rgb, dtype=np.uint8, order="C", copy=True)

    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(unary)
    # A zero Potts weight switches its kernel off.
    if gaussian_compat > 0.0:
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    if bilateral_compat > 0.0:
        crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    marginals = np.asarray(crf.inference(int(iterations)), dtype=np.float32).reshape(2, height, width)
    return marginals[1] > marginals[0]

"""Segmentation metrics per image (IoU, Dice, pixel ROC AUC) and statistics over images.

Conventions, shared by every function here:

* Masks are binarised explicitly: a pixel is foreground when its value is > 0. That covers bool masks, 0/1 and
  0/255 label images alike. Masks of different shapes are an error, never resized.
* Empty masks: ground truth and prediction both empty -> IoU = Dice = 1 (the prediction is exactly right);
  exactly one of them empty -> IoU = Dice = 0.
* Pixel AUC is the area under the ROC curve of a continuous map (saliency, probability) against the ground truth,
  computed from ranks (Mann-Whitney U, ties counted as one half). It is undefined when the ground truth contains one
  class only. The functions then return None, which reports show as "n/a" rather than 0 or 1.
* Spread over images is the sample standard deviation (ddof = 1), and confidence intervals use the t distribution
  with n - 1 degrees of freedom.

Argument names follow the `y_pred` (prediction) / `y` (ground truth) convention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = [
    "CONFIDENCE_LEVEL",
    "STD_DDOF",
    "binarize",
    "dice",
    "iou",
    "paired_ttest",
    "pearson_correlation",
    "pixel_auc",
    "summarize",
]

logger = logging.getLogger(__name__)

STD_DDOF = 1
"""Delta degrees of freedom of every standard deviation over images: 1, the sample standard deviation."""

CONFIDENCE_LEVEL = 0.95
"""Coverage of the confidence intervals that `summarize` returns (two-sided, t distribution)."""


def binarize(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return `mask > 0` as a new bool array of the same shape.

    Args:
        mask: label array of any shape with at least one element (bool, integer or float). NaN counts as
            background because NaN > 0 is false.
        name: how error messages refer to the array.

    Raises:
        InvalidInputError: when the array is empty, zero-dimensional or not numeric.
    """
    array = np.asarray(mask)
    if array.ndim == 0 or array.size == 0:
        raise InvalidInputError(f"{name} has shape {array.shape}; expected an array with at least one pixel.")
    if array.dtype == bool:
        return array.copy()
    if not (np.issubdtype(array.dtype, np.number)):
        raise InvalidInputError(f"{name} has dtype {array.dtype}; expected a bool or numeric mask.")
    return array > 0


def _binarize_pair(y_pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binarise a prediction and a ground truth after checking that their shapes are equal."""
    prediction = np.asarray(y_pred)
    truth = np.asarray(y)
    if prediction.shape != truth.shape:
        raise InvalidInputError(
            f"y_pred has shape {prediction.shape} but y has shape {truth.shape}; metrics compare pixel by pixel, so "
            "resample the prediction onto the ground-truth grid before scoring."
        )
    return binarize(prediction, "y_pred"), binarize(truth, "y")


def dice(y_pred: np.ndarray, y: np.ndarray) -> float:
    """Compute the Dice similarity coefficient 2 |P & G| / (|P| + |G|) of two masks.

    Args:
        y_pred: predicted mask, any shape (HxW for an image), foreground where > 0.
        y: ground-truth mask of the same shape, foreground where > 0.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        InvalidInputError: when the shapes differ (the message names both).
    """
    prediction, truth = _binarize_pair(y_pred, y)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    intersection = int(np.logical_and(prediction, truth).sum())
    return 2.0 * intersection / total


def iou(y_pred: np.ndarray, y: np.ndarray) -> float:
    """Compute the intersection over union (Jaccard index) |P & G| / |P | G| of two masks.

    Args:
        y_pred: predicted mask, any shape (HxW for an image), foreground where > 0.
        y: ground-truth mask of the same shape, foreground where > 0.

    Returns:
        IoU in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        InvalidInputError: when the shapes differ (the message names both).
    """
    prediction, truth = _binarize_pair(y_pred, y)
    union = int(np.logical_or(prediction, truth).sum())
    if union == 0:
        return 1.0
    intersection = int(np.logical_and(prediction, truth).sum())
    return intersection / union


def _finite_float_map(values: np.ndarray, name: str) -> np.ndarray:
    """Return `values` as float64, raising InvalidInputError when it is empty, not numeric or not finite."""
    array = np.asarray(values)
    if array.ndim == 0 or array.size == 0:
        raise InvalidInputError(f"{name} has shape {array.shape}; expected an array with at least one pixel.")
    if array.dtype != bool and not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(f"{name} has dtype {array.dtype}; expected a numeric map.")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise InvalidInputError(f"{name} contains {count} NaN or infinite values; replace them before scoring.")
    return array


def pixel_auc(score_map: np.ndarray, y: np.ndarray) -> float | None:
    """Compute the pixel-wise ROC AUC of a continuous map against a ground-truth mask.

    The AUC equals the probability that a random foreground pixel scores higher than a random background pixel,
    with ties counted as one half: the Mann-Whitney U statistic divided by n_foreground * n_background. Only the
    order of the scores matters, so any monotone rescaling (for example 0..1 floats saved as 0..255) gives the
    same AUC.

    Args:
        score_map: continuous map (saliency in [0, 1], probability, logit), same shape as `y`, finite values.
        y: ground-truth mask, foreground where > 0.

    Returns:
        AUC in [0, 1], or None when `y` is all foreground or all background (the AUC is then undefined).

    Raises:
        InvalidInputError: when the shapes differ or the map contains NaN or infinite values.
    """
    scores = np.asarray(score_map)
    truth = np.asarray(y)
    if scores.shape != truth.shape:
        raise InvalidInputError(
            f"score_map has shape {scores.shape} but y has shape {truth.shape}; resample the map onto the "
            "ground-truth grid before scoring."
        )
    values = _finite_float_map(scores, "score_map").ravel()
    foreground = binarize(truth, "y").ravel()
    n_foreground = int(foreground.sum())
    n_background = foreground.size - n_foreground
    if n_foreground == 0 or n_background == 0:
        return None

    # Count foreground and background pixels per distinct score. A foreground pixel beats every background pixel
    # with a lower score and ties with the background pixels of equal score (worth one half each).
    _, level = np.unique(values, return_inverse=True)
    level = level.ravel()
    n_levels = int(level.max()) + 1
    foreground_per_level = np.bincount(level[foreground], minlength=n_levels).astype(np.int64)
    background_per_level = np.bincount(level[~foreground], minlength=n_levels).astype(np.int64)
    background_below = np.cumsum(background_per_level) - background_per_level
    # Twice the U statistic, in exact integer arithmetic.
    twice_u = int(np.sum(foreground_per_level * (2 * background_below + background_per_level)))
    return twice_u / (2.0 * n_foreground * n_background)


def pearson_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Compute the Pearson correlation coefficient of two maps pixel by pixel.

    Args:
        a, b: continuous maps of the same shape (for example two saliency maps of one image), finite values.

    Returns:
        The correlation in [-1, 1], or None when either map is constant (the coefficient is then undefined).

    Raises:
        InvalidInputError: when the shapes differ or a map contains NaN or infinite values.
    """
    first = np.asarray(a)
    second = np.asarray(b)
    if first.shape != second.shape:
        raise InvalidInputError(f"The maps have shapes {first.shape} and {second.shape}; expected equal shapes.")
    x = _finite_float_map(first, "a").ravel()
    z = _finite_float_map(second, "b").ravel()
    x = x - x.mean()
    z = z - z.mean()
    denominator = math.sqrt(float(np.dot(x, x)) * float(np.dot(z, z)))
    if denominator == 0.0:
        return None
    return float(np.clip(np.dot(x, z) / denominator, -1.0, 1.0))


def _defined_values(values: Iterable[float | None]) -> np.ndarray:
    """Drop None and NaN entries (undefined metrics) and return the rest as float64."""
    kept = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    return np.asarray(kept, dtype=np.float64)


def summarize(values: Iterable[float | None]) -> dict:
    """Compute the mean, sample standard deviation and 95 % confidence interval of per-image values.

    None and NaN entries (an AUC that is undefined for an image) are left out, and `n` counts the rest.

    Args:
        values: one metric value per image.

    Returns:
        dict with keys
        ``mean``: arithmetic mean, None when n = 0;
        ``std``: sample standard deviation (ddof = 1), None when n < 2;
        ``n``: number of defined values;
        ``ci95_low``, ``ci95_high``: mean -/+ t(0.975, n - 1) * std / sqrt(n), None when n < 2, equal to the mean
        when the values do not vary.
    """
    from scipy import stats

    defined = _defined_values(values)
    n = int(defined.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci95_low": None, "ci95_high": None}
    mean = float(defined.mean())
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "ci95_low": None, "ci95_high": None}
    # Identical values get an exact zero: numpy's two-pass variance can leave a rounding residue of about 1e-17.
    std = 0.0 if float(np.ptp(defined)) == 0.0 else float(defined.std(ddof=STD_DDOF))
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2.0, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half_width, "ci95_high": mean + half_width}


def paired_ttest(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """Run a two-sided paired t-test (scipy.stats.ttest_rel) between two methods scored on the same images.

    Entry i of `a` and entry i of `b` must belong to the same image. Pairs in which either value is None or NaN
    (an undefined AUC) are dropped together.

    Args:
        a: per-image values of the first method.
        b: per-image values of the second method, same length and order.

    Returns:
        dict with keys
        ``n``: number of complete pairs;
        ``mean_difference``: mean of a - b, None when n = 0;
        ``statistic``: t statistic of a - b, None when it is undefined;
        ``pvalue``: two-sided p-value, None when it is undefined;
        ``df``: degrees of freedom n - 1, None when n < 2;
        ``note``: None, or why the test is undefined (fewer than 2 pairs, or all differences equal, which makes
        the standard error zero).

    Raises:
        InvalidInputError: when the sequences have different lengths.
    """
    from scipy import stats

    first = list(a)
    second = list(b)
    if len(first) != len(second):
        raise InvalidInputError(
            f"Paired t-test needs one value per image from each method, but got {len(first)} and {len(second)} "
            "values; pass the two methods' results on the same images in the same order."
        )
    kept = [
        (float(x), float(z))
        for x, z in zip(first, second)
        if x is not None and z is not None and not math.isnan(float(x)) and not math.isnan(float(z))
    ]
    n = len(kept)
    result = {"n": n, "mean_difference": None, "statistic": None, "pvalue": None, "df": None, "note": None}
    if n == 0:
        result["note"] = "no complete pairs"
        return result
    x_values = np.asarray([pair[0] for pair in kept])
    z_values = np.asarray([pair[1] for pair in kept])
    differences = x_values - z_values
    result["mean_difference"] = float(differences.mean())
    if n < 2:
        result["note"] = "fewer than 2 complete pairs"
        return result
    result["df"] = n - 1
    # Compare the extremes rather than the variance, because rounding can leave a tiny non-zero variance when all
    # differences are equal, and scipy would then report a huge t and a p-value of about 0.
    if float(np.ptp(differences)) == 0.0:
        result["note"] = "all paired differences are equal (zero variance), so t is undefined"
        return result
    test = stats.ttest_rel(x_values, z_values)
    result["statistic"] = float(test.statistic)
    result["pvalue"] = float(test.pvalue)
    return result

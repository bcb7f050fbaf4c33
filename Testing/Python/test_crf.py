"""Tests of the dense CRF that turns a saliency map into the coarse mask (real pydensecrf)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedCLIPSAMLib.crf import crf_refine, unary_energies
from MedCLIPSAMLib.errors import InvalidInputError

HEIGHT, WIDTH = 96, 128


def _disc(radius: float) -> np.ndarray:
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    return (rows - 48) ** 2 + (columns - 60) ** 2 <= radius**2


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float((prediction & truth).sum()) / float(prediction.sum() + truth.sum())


def _flat_image() -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), 120, dtype=np.uint8)


def _noisy_saliency(disc: np.ndarray) -> np.ndarray:
    """Weak disc evidence (0.65 inside, 0.35 outside) plus uniform noise of +-0.3, clipped to [0, 1]."""
    noise = np.random.RandomState(0).uniform(-0.3, 0.3, size=disc.shape)
    return np.clip(np.where(disc, 0.65, 0.35) + noise, 0.0, 1.0)


def _errors_and_components(mask: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    _, components = ndimage.label(mask, structure=np.ones((3, 3)))
    return int((mask != truth).sum()), int(components)


def test_mask_follows_disc_saliency():
    disc = _disc(25)
    saliency = ndimage.gaussian_filter(np.where(disc, 0.9, 0.1), 1.0)
    mask = crf_refine(_flat_image(), saliency)
    assert mask.shape == (HEIGHT, WIDTH)
    assert mask.dtype == bool
    assert _dice(mask, disc) > 0.9


def test_all_zero_saliency_gives_empty_mask():
    mask = crf_refine(_flat_image(), np.zeros((HEIGHT, WIDTH)))
    assert not mask.any()


def test_mask_snaps_to_image_edge():
    # The saliency overshoots the object by 6 pixels; the bilateral kernel pulls the mask to the colour edge.
    disc = _disc(25)
    rgb = np.full((HEIGHT, WIDTH, 3), 60, dtype=np.uint8)
    rgb[disc] = 200
    saliency = np.where(_disc(31), 0.6, 0.1)
    unary_only = crf_refine(rgb, saliency, gaussian_compat=0, bilateral_compat=0)
    refined = crf_refine(rgb, saliency)
    assert _dice(unary_only, disc) < 0.85
    assert _dice(refined, disc) > 0.97


def test_without_pairwise_labels_follow_unary():
    disc = _disc(25)
    saliency = _noisy_saliency(disc)
    mask = crf_refine(_flat_image(), saliency, gaussian_compat=0, bilateral_compat=0)
    assert np.array_equal(mask, saliency > 0.5)


def test_stronger_smoothness_removes_more_noise():
    disc = _disc(25)
    saliency = _noisy_saliency(disc)
    default_errors, default_components = _errors_and_components(crf_refine(_flat_image(), saliency), disc)
    strong_errors, strong_components = _errors_and_components(
        crf_refine(_flat_image(), saliency, gaussian_compat=10), disc
    )
    raw_errors, raw_components = _errors_and_components(saliency > 0.5, disc)
    assert default_errors < raw_errors
    assert strong_errors < default_errors
    assert strong_components < default_components
    assert default_components < raw_components


def test_tau_changes_result():
    disc = _disc(25)
    saliency = _noisy_saliency(disc)
    default = crf_refine(_flat_image(), saliency)
    hot = crf_refine(_flat_image(), saliency, tau=5.0)
    assert not np.array_equal(default, hot)


def test_unary_energies_values():
    saliency = np.array([[0.0, 0.25], [0.5, 1.0]])
    energies = unary_energies(saliency, tau=1.05)
    assert energies.shape == (2, 4)
    assert energies.dtype == np.float32
    assert energies.flags["C_CONTIGUOUS"]

    def logistic(value: float) -> float:
        return 1.0 / (1.0 + np.exp(-value))

    s = 0.25
    assert energies[0, 1] == pytest.approx(-np.log(1 - s + 1e-8) / (1.05 * logistic(1 - s)), rel=1e-6)
    assert energies[1, 1] == pytest.approx(-np.log(s + 1e-8) / (1.05 * logistic(s)), rel=1e-6)
    assert energies[0, 2] == pytest.approx(energies[1, 2])  # s = 0.5: no preference
    assert energies[1, 0] == pytest.approx(-np.log(1e-8) / (1.05 * 0.5), rel=1e-6)  # finite at s = 0


def test_unary_energies_scale_with_inverse_tau():
    saliency = np.random.RandomState(3).rand(5, 7)
    assert np.allclose(unary_energies(saliency, tau=2.1), unary_energies(saliency, tau=1.05) / 2.0, rtol=1e-6)


def test_read_only_inputs_accepted():
    disc = _disc(25)
    rgb = _flat_image()
    saliency = np.where(disc, 0.9, 0.1).astype(np.float32)
    rgb.setflags(write=False)
    saliency.setflags(write=False)
    assert _dice(crf_refine(rgb, saliency), disc) > 0.9


def test_non_contiguous_inputs_accepted():
    disc = _disc(25)
    rgb = np.asfortranarray(_flat_image())
    saliency = np.asfortranarray(np.where(disc, 0.9, 0.1))
    assert _dice(crf_refine(rgb, saliency), disc) > 0.9


def test_out_of_range_saliency_clipped_with_warning():
    disc = _disc(25)
    saliency = np.where(disc, 1.5, -0.2)
    with pytest.warns(UserWarning, match="clipping"):
        mask = crf_refine(_flat_image(), saliency)
    assert np.array_equal(mask, crf_refine(_flat_image(), np.clip(saliency, 0.0, 1.0)))


def test_nan_saliency_rejected():
    saliency = np.zeros((HEIGHT, WIDTH))
    saliency[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        crf_refine(_flat_image(), saliency)


def test_shape_mismatch_rejected():
    with pytest.raises(InvalidInputError, match="does not match"):
        crf_refine(_flat_image(), np.zeros((HEIGHT, WIDTH + 1)))


def test_gray_image_rejected():
    with pytest.raises(InvalidInputError, match="HxWx3 uint8"):
        crf_refine(np.zeros((HEIGHT, WIDTH), dtype=np.uint8), np.zeros((HEIGHT, WIDTH)))


@pytest.mark.parametrize(
    "kwargs",
    [{"tau": 0.0}, {"gaussian_sxy": -1.0}, {"bilateral_srgb": float("nan")}, {"gaussian_compat": -1.0},
     {"iterations": 0}, {"iterations": 1.5}],
)
def test_invalid_parameters_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        crf_refine(_flat_image(), np.zeros((HEIGHT, WIDTH)), **kwargs)

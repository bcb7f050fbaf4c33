"""Tests of MedCLIPSAMLib.metrics against hand-computed values, scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.metrics import (
    binarize,
    dice,
    iou,
    paired_ttest,
    pearson_correlation,
    pixel_auc,
    summarize,
)


def test_dice_hand_computed_point_eight():
    # |P| = 3, |G| = 2, |P & G| = 2: Dice = 4 / 5, IoU = 2 / 3.
    y_pred = np.array([[1, 1], [1, 0]])
    y = np.array([[1, 1], [0, 0]])
    assert dice(y_pred, y) == pytest.approx(0.8)
    assert iou(y_pred, y) == pytest.approx(2.0 / 3.0)


def test_dice_iou_disjoint_masks():
    y_pred = np.array([[1, 0], [0, 0]])
    y = np.array([[0, 0], [0, 1]])
    assert dice(y_pred, y) == 0.0
    assert iou(y_pred, y) == 0.0


def test_dice_iou_identical_masks():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    assert dice(mask, mask) == 1.0
    assert iou(mask, mask) == 1.0


@pytest.mark.parametrize("metric", [dice, iou])
def test_both_masks_empty_score_one(metric):
    empty = np.zeros((4, 4), dtype=np.uint8)
    assert metric(empty, empty) == 1.0


@pytest.mark.parametrize("metric", [dice, iou])
def test_one_mask_empty_scores_zero(metric):
    empty = np.zeros((4, 4), dtype=np.uint8)
    full = np.ones((4, 4), dtype=np.uint8)
    assert metric(empty, full) == 0.0
    assert metric(full, empty) == 0.0


def test_mask_encodings_binarised_equally():
    pattern = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)
    truth = np.array([[0, 1, 0], [0, 1, 1]], dtype=bool)
    reference = dice(pattern, truth)
    assert dice(pattern.astype(np.uint8) * 255, truth) == reference
    assert dice(pattern.astype(np.uint8), truth.astype(np.uint8) * 255) == reference
    assert dice(pattern.astype(np.float32) * 0.3, truth) == reference


def test_binarize_threshold_strictly_above_zero():
    values = np.array([-1.0, 0.0, 1e-9, 2.0, np.nan])
    assert binarize(values).tolist() == [False, False, True, True, False]


def test_binarize_does_not_alias_bool_input():
    mask = np.zeros(3, dtype=bool)
    result = binarize(mask)
    result[0] = True
    assert not mask[0]


def test_metrics_match_sklearn_on_random_masks():
    from sklearn.metrics import f1_score, jaccard_score

    generator = np.random.default_rng(1)
    for _ in range(20):
        y_pred = generator.random((13, 17)) > generator.random()
        y = generator.random((13, 17)) > generator.random()
        if not y_pred.any() and not y.any():
            continue
        assert dice(y_pred, y) == pytest.approx(f1_score(y.ravel(), y_pred.ravel(), zero_division=0.0))
        assert iou(y_pred, y) == pytest.approx(jaccard_score(y.ravel(), y_pred.ravel(), zero_division=0.0))


@pytest.mark.parametrize("function", [dice, iou, pixel_auc])
def test_shape_mismatch_names_both_shapes(function):
    with pytest.raises(InvalidInputError) as raised:
        function(np.zeros((4, 5)), np.zeros((5, 4)))
    assert "(4, 5)" in str(raised.value)
    assert "(5, 4)" in str(raised.value)


def test_empty_array_rejected():
    with pytest.raises(InvalidInputError):
        dice(np.zeros((0, 3)), np.zeros((0, 3)))


def test_pixel_auc_hand_computed():
    # Foreground scores 0.9, 0.4; background 0.5, 0.1. Pairs won: (0.9 > 0.5), (0.9 > 0.1), (0.4 > 0.1) = 3 of 4.
    scores = np.array([[0.9, 0.4], [0.5, 0.1]])
    y = np.array([[1, 1], [0, 0]])
    assert pixel_auc(scores, y) == pytest.approx(0.75)


def test_pixel_auc_ties_count_half():
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    y = np.array([1, 0, 1, 0])
    assert pixel_auc(scores, y) == pytest.approx(0.5)


def test_pixel_auc_matches_sklearn_random_with_ties():
    generator = np.random.default_rng(7)
    for trial in range(25):
        shape = (int(generator.integers(2, 30)), int(generator.integers(2, 30)))
        # Few distinct levels so that many scores tie.
        levels = int(generator.integers(1, 6)) if trial % 2 else 1000
        scores = generator.integers(0, levels, size=shape).astype(np.float32) / levels
        y = generator.random(shape) < generator.uniform(0.05, 0.95)
        if y.all() or not y.any():
            continue
        assert pixel_auc(scores, y) == pytest.approx(roc_auc_score(y.ravel(), scores.ravel()), abs=1e-12)


def test_pixel_auc_matches_sklearn_continuous():
    generator = np.random.default_rng(3)
    y = generator.random((40, 50)) < 0.3
    scores = generator.normal(size=(40, 50)) + 0.8 * y
    assert pixel_auc(scores, y) == pytest.approx(roc_auc_score(y.ravel(), scores.ravel()), abs=1e-12)


def test_pixel_auc_invariant_to_monotone_rescaling():
    generator = np.random.default_rng(4)
    y = generator.random((20, 20)) < 0.4
    scores = generator.random((20, 20))
    assert pixel_auc(scores, y) == pytest.approx(pixel_auc(np.round(scores * 255), y), abs=0.01)
    assert pixel_auc(scores, y) == pixel_auc(scores * 10.0 + 3.0, y)


@pytest.mark.parametrize("fill", [0, 1])
def test_pixel_auc_single_class_is_none(fill):
    scores = np.random.default_rng(0).random((6, 6))
    y = np.full((6, 6), fill, dtype=np.uint8)
    assert pixel_auc(scores, y) is None


def test_pixel_auc_perfect_and_inverted():
    y = np.array([0, 0, 1, 1])
    assert pixel_auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert pixel_auc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0


def test_pixel_auc_rejects_nan():
    scores = np.array([0.1, np.nan, 0.3])
    with pytest.raises(InvalidInputError):
        pixel_auc(scores, np.array([0, 1, 1]))


def test_pearson_matches_numpy():
    generator = np.random.default_rng(5)
    a = generator.random((9, 11))
    b = a * 0.5 + generator.random((9, 11))
    assert pearson_correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_pearson_constant_map_is_none():
    assert pearson_correlation(np.ones((3, 3)), np.arange(9.0).reshape(3, 3)) is None


def test_summarize_matches_numpy_and_scipy():
    values = [0.2, 0.5, 0.9, 0.4]
    summary = summarize(values)
    std = float(np.std(values, ddof=1))
    half_width = stats.t.ppf(0.975, df=3) * std / math.sqrt(4)
    assert summary["n"] == 4
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["std"] == pytest.approx(std)
    assert summary["ci95_low"] == pytest.approx(0.5 - half_width)
    assert summary["ci95_high"] == pytest.approx(0.5 + half_width)


def test_summarize_ci_matches_scipy_interval():
    values = [0.61, 0.72, 0.55, 0.8, 0.66, 0.7]
    low, high = stats.t.interval(0.95, df=5, loc=np.mean(values), scale=stats.sem(values))
    summary = summarize(values)
    assert summary["ci95_low"] == pytest.approx(low)
    assert summary["ci95_high"] == pytest.approx(high)


def test_summarize_skips_undefined_values():
    summary = summarize([0.5, None, 0.7, float("nan")])
    assert summary["n"] == 2
    assert summary["mean"] == pytest.approx(0.6)


def test_summarize_single_value_has_no_spread():
    summary = summarize([0.3])
    assert summary["mean"] == pytest.approx(0.3)
    assert summary["std"] is None
    assert summary["ci95_low"] is None


def test_summarize_no_values():
    summary = summarize([None])
    assert summary["n"] == 0
    assert summary["mean"] is None


def test_summarize_constant_values_zero_width_interval():
    summary = summarize([0.4, 0.4, 0.4])
    assert summary["std"] == 0.0
    assert summary["ci95_low"] == pytest.approx(0.4)
    assert summary["ci95_high"] == pytest.approx(0.4)


def test_paired_ttest_matches_scipy():
    a = [0.61, 0.72, 0.55, 0.80, 0.66]
    b = [0.50, 0.70, 0.40, 0.79, 0.60]
    result = paired_ttest(a, b)
    reference = stats.ttest_rel(a, b)
    assert result["n"] == 5
    assert result["statistic"] == pytest.approx(reference.statistic)
    assert result["pvalue"] == pytest.approx(reference.pvalue)
    assert result["df"] == 4
    assert result["note"] is None


def test_paired_ttest_drops_incomplete_pairs():
    result = paired_ttest([0.5, None, 0.7, 0.9], [0.4, 0.3, None, 0.5])
    reference = stats.ttest_rel([0.5, 0.9], [0.4, 0.5])
    assert result["n"] == 2
    assert result["pvalue"] == pytest.approx(reference.pvalue)


def test_paired_ttest_single_pair_undefined():
    result = paired_ttest([0.5], [0.4])
    assert result["pvalue"] is None
    assert result["mean_difference"] == pytest.approx(0.1)
    assert "fewer than 2" in result["note"]


def test_paired_ttest_equal_differences_undefined():
    result = paired_ttest([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert result["statistic"] is None
    assert result["pvalue"] is None
    assert "zero variance" in result["note"]


def test_paired_ttest_identical_methods_undefined():
    result = paired_ttest([0.5, 0.6], [0.5, 0.6])
    assert result["pvalue"] is None
    assert result["mean_difference"] == 0.0


def test_paired_ttest_length_mismatch_rejected():
    with pytest.raises(InvalidInputError):
        paired_ttest([0.1, 0.2], [0.1])

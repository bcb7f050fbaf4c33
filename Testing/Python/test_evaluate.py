"""Tests of MedCLIPSAMLib.evaluate and `medclipsam evaluate`: pairing, mask encodings, scoring, reports."""

from __future__ import annotations

import contextlib
import io as text_io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats
from sklearn.metrics import roc_auc_score

from MedCLIPSAMLib import evaluate as evaluation
from MedCLIPSAMLib import reports
from MedCLIPSAMLib.errors import InvalidInputError

BUSI_NAMES = ("benign (101)", "benign (269)", "malignant (144)")
CHEST_NAMES = ("kjr-21-e25-g001-l-a.jpg", "X-ray_of_cyst_in_pneumocystis_pneumonia_1.jpg")
PLUS_MINUS = "\u00b1"


def _touch_png(path: Path, shape=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(path)
    return path


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    from MedCLIPSAMLib.cli import main

    stdout, stderr = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def _markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Parse the Markdown table whose header line starts with `first_header` into dicts."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split(" | ")]
    records = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        records.append(dict(zip(header, cells)))
    return records


# --------------------------------------------------------------------------------------------------------------------
# Pairing by name


def test_pairing_mask_name_variants(tmp_path):
    images = tmp_path / "images"
    masks = tmp_path / "masks"
    for name in ("a.png", "b.jpg", "c.png", "d.png"):
        _touch_png(images / name)
    for name in ("a.png", "b_mask.png", "c_mask.png", "c_mask_1.png", "c_mask_2.png", "orphan_mask.png"):
        _touch_png(masks / name)
    result = evaluation.pair_images_and_masks(images, masks)
    masks_by_image = {pair.name: [path.name for path in pair.masks] for pair in result.pairs}
    assert masks_by_image == {
        "a.png": ["a.png"],
        "b.jpg": ["b_mask.png"],
        "c.png": ["c_mask.png", "c_mask_1.png", "c_mask_2.png"],
    }
    assert [path.name for path in result.unmatched_images] == ["d.png"]
    assert [path.name for path in result.unmatched_masks] == ["orphan_mask.png"]


def test_pairing_independent_of_listing_order(tmp_path, monkeypatch):
    images = tmp_path / "images"
    masks = tmp_path / "masks"
    for index in range(6):
        _touch_png(images / f"case {index}.png")
        _touch_png(masks / f"case {index}_mask.png")
    expected = [(pair.name, pair.mask_names) for pair in evaluation.pair_images_and_masks(images, masks).pairs]

    original = Path.iterdir

    def shuffled(self):
        entries = list(original(self))
        # Reverse one folder only, so that the two listings disagree.
        return iter(entries[::-1] if self.name == "masks" else entries)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    pairs = evaluation.pair_images_and_masks(images, masks).pairs
    assert [(pair.name, pair.mask_names) for pair in pairs] == expected
    assert all(pair.mask_names == pair.image.stem + "_mask.png" for pair in pairs)


def test_pairing_images_and_masks_in_one_folder(tmp_path):
    for name in ("a.png", "a_mask.png", "a_mask_1.png", "b.png", "b_mask.png", "c.png"):
        _touch_png(tmp_path / name)
    result = evaluation.pair_images_and_masks(tmp_path, tmp_path)
    assert {pair.name: pair.mask_names for pair in result.pairs} == {"a.png": "a_mask.png;a_mask_1.png", "b.png": "b_mask.png"}
    assert [path.name for path in result.unmatched_images] == ["c.png"]


def test_pairing_exact_name_preferred_over_mask_suffix(tmp_path):
    images = tmp_path / "images"
    masks = tmp_path / "masks"
    _touch_png(images / "x.png")
    _touch_png(images / "x_mask.png")
    _touch_png(masks / "x_mask.png")
    result = evaluation.pair_images_and_masks(images, masks)
    assert [pair.name for pair in result.pairs] == ["x_mask.png"]


def test_pairing_natural_sort_order(tmp_path):
    images = tmp_path / "images"
    masks = tmp_path / "masks"
    for number in (10, 2, 1):
        _touch_png(images / f"benign ({number}).png")
        _touch_png(masks / f"benign ({number})_mask.png")
    names = [pair.name for pair in evaluation.pair_images_and_masks(images, masks).pairs]
    assert names == ["benign (1).png", "benign (2).png", "benign (10).png"]


def test_pairing_duplicate_image_stem_rejected(tmp_path):
    images = tmp_path / "images"
    _touch_png(images / "a.png")
    _touch_png(images / "a.tif")
    _touch_png(tmp_path / "masks" / "a_mask.png")
    with pytest.raises(InvalidInputError) as raised:
        evaluation.pair_images_and_masks(images, tmp_path / "masks")
    assert "a.png" in str(raised.value)


def test_pairing_missing_folder_rejected(tmp_path):
    with pytest.raises(InvalidInputError):
        evaluation.pair_images_and_masks(tmp_path / "absent", tmp_path)


def test_pairing_ignores_other_files(tmp_path):
    images = tmp_path / "images"
    _touch_png(images / "a.png")
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden.png").write_bytes(b"")
    _touch_png(tmp_path / "masks" / "a_mask.png")
    result = evaluation.pair_images_and_masks(images, tmp_path / "masks")
    assert [pair.name for pair in result.pairs] == ["a.png"]
    assert [path.name for path in result.ignored_files] == ["notes.txt"]


def test_prediction_pairing_strips_prediction_suffix(tmp_path):
    predictions = tmp_path / "predictions"
    _touch_png(predictions / "a_pred.png")
    _touch_png(predictions / "b_mask.png")
    _touch_png(tmp_path / "masks" / "a_mask.png")
    _touch_png(tmp_path / "masks" / "b_mask.png")
    result = evaluation.pair_predictions_and_masks(predictions, tmp_path / "masks")
    assert {pair.name: pair.mask_names for pair in result.pairs} == {"a_pred.png": "a_mask.png", "b_mask.png": "b_mask.png"}


# --------------------------------------------------------------------------------------------------------------------
# Mask encodings


def _reference_mask() -> np.ndarray:
    mask = np.zeros((24, 32), dtype=bool)
    mask[5:15, 8:20] = True
    mask[18:22, 2:5] = True
    return mask


@pytest.mark.parametrize(
    "encoding",
    ["gray_255", "gray_01", "one_bit", "rgb_red", "rgb_blue", "rgba_opaque"],
)
def test_read_mask_encodings(tmp_path, encoding):
    mask = _reference_mask()
    if encoding == "gray_255":
        image = Image.fromarray(mask.astype(np.uint8) * 255)
    elif encoding == "gray_01":
        image = Image.fromarray(mask.astype(np.uint8))
    elif encoding == "one_bit":
        image = Image.fromarray(mask.astype(np.uint8) * 255).convert("1")
        assert image.mode == "1"
    else:
        channels = 4 if encoding == "rgba_opaque" else 3
        colour = np.zeros((*mask.shape, channels), dtype=np.uint8)
        colour[..., 2 if encoding == "rgb_blue" else 0] = mask * 200
        if encoding == "rgba_opaque":
            colour[..., 3] = 255
        image = Image.fromarray(colour)
    path = tmp_path / f"{encoding}.png"
    image.save(path)
    read = evaluation.read_mask(path)
    assert read.dtype == bool
    assert np.array_equal(read, mask)


def test_ground_truth_is_union_of_masks(tmp_path):
    first = np.zeros((10, 10), dtype=np.uint8)
    first[1:3, 1:3] = 255
    second = np.zeros((10, 10), dtype=np.uint8)
    second[6:9, 5:8] = 255
    Image.fromarray(first).save(tmp_path / "a_mask.png")
    Image.fromarray(second).save(tmp_path / "a_mask_1.png")
    pair = evaluation.ImageMaskPair(tmp_path / "a.png", (tmp_path / "a_mask.png", tmp_path / "a_mask_1.png"))
    union = evaluation.read_ground_truth(pair)
    assert int(union.sum()) == 4 + 9


def test_ground_truth_masks_of_different_sizes_rejected(tmp_path):
    _touch_png(tmp_path / "a_mask.png", (10, 10))
    _touch_png(tmp_path / "a_mask_1.png", (10, 12))
    pair = evaluation.ImageMaskPair(tmp_path / "a.png", (tmp_path / "a_mask.png", tmp_path / "a_mask_1.png"))
    with pytest.raises(InvalidInputError):
        evaluation.read_ground_truth(pair)


# --------------------------------------------------------------------------------------------------------------------
# Scoring predictions (library)


def test_evaluate_predictions_arrays_dice_point_eight():
    y_pred = np.array([[1, 1], [1, 0]], dtype=np.uint8)
    y = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    rows = evaluation.evaluate_predictions([("case", y_pred, y)], method="unet")
    assert len(rows) == 1
    assert rows[0].dice == pytest.approx(0.8)
    assert rows[0].iou == pytest.approx(2.0 / 3.0)
    assert rows[0].auc is None
    assert rows[0].method == "unet"


def test_evaluate_predictions_score_map_auc_matches_sklearn():
    generator = np.random.default_rng(2)
    y = generator.random((16, 16)) < 0.3
    scores = generator.random((16, 16)) + 0.5 * y
    case = evaluation.PredictionCase("case", scores > 0.8, y, score_map=scores)
    rows = evaluation.evaluate_predictions([case])
    assert rows[0].auc == pytest.approx(roc_auc_score(y.ravel(), scores.ravel()))


def test_evaluate_predictions_shape_mismatch_names_case():
    with pytest.raises(InvalidInputError) as raised:
        evaluation.evaluate_predictions([("case 7", np.zeros((4, 4)), np.zeros((4, 5)))])
    assert "case 7" in str(raised.value)
    assert "(4, 5)" in str(raised.value)


def test_evaluate_predictions_empty_masks_convention():
    empty = np.zeros((5, 5), dtype=np.uint8)
    rows = evaluation.evaluate_predictions([("both empty", empty, empty), ("missed", empty, np.ones((5, 5)))])
    assert rows[0].dice == 1.0
    assert rows[0].found is False
    assert rows[1].dice == 0.0


def test_sam_stage_score_map_ranks_mask_first():
    mask = np.array([[1, 0], [1, 0]], dtype=bool)
    saliency = np.array([[0.0, 1.0], [0.2, 0.9]], dtype=np.float32)
    scores = evaluation.sam_stage_score_map(mask, saliency)
    assert scores[:, 0].min() > scores[:, 1].max()
    assert scores[1, 0] > scores[0, 0]


# --------------------------------------------------------------------------------------------------------------------
# Statistics and report writers on hand-made rows


def _hand_rows() -> list[evaluation.EvaluationRow]:
    generator = np.random.default_rng(11)
    rows = []
    for method, offset in (("gscorecam", 0.1), ("gradcam", 0.0)):
        for stage in (evaluation.STAGE_CRF, evaluation.STAGE_SAM):
            for index in range(6):
                value = float(np.clip(0.4 + offset + 0.1 * generator.normal(), 0.0, 1.0))
                auc = None if index == 0 else float(np.clip(0.7 + 0.1 * generator.normal(), 0.0, 1.0))
                rows.append(
                    evaluation.EvaluationRow(
                        f"img{index}.png", f"img{index}_mask.png", "tumor", method, stage,
                        value * 0.8, value, auc, True, 0.5,
                    )  # fmt: skip
                )
    return rows


def test_csv_round_trip_keeps_values(tmp_path):
    rows = _hand_rows()
    path = reports.write_rows_csv(tmp_path / "rows.csv", rows)
    assert reports.read_rows_csv(path) == rows


def test_csv_writes_undefined_auc_as_na(tmp_path):
    path = reports.write_rows_csv(tmp_path / "rows.csv", _hand_rows())
    first_data_line = path.read_text(encoding="utf-8").splitlines()[1]
    assert ",n/a," in first_data_line


def test_compare_methods_matches_scipy():
    rows = _hand_rows()
    comparisons = evaluation.compare_methods(rows, "gscorecam", "gradcam")
    dice_sam = next(
        item for item in comparisons if item.metric == "dice" and evaluation.STAGE_SAM in item.first
    )
    a = [row.dice for row in rows if row.method == "gscorecam" and row.stage == evaluation.STAGE_SAM]
    b = [row.dice for row in rows if row.method == "gradcam" and row.stage == evaluation.STAGE_SAM]
    assert dice_sam.result["pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_compare_methods_auc_skips_undefined_pairs():
    comparisons = evaluation.compare_methods(_hand_rows(), "gscorecam", "gradcam")
    auc = next(item for item in comparisons if item.metric == "auc")
    assert auc.result["n"] == 5


def test_summary_table_reports_undefined_auc_count():
    records = _markdown_table(reports.format_summary_table(_hand_rows()), "method")
    assert len(records) == 4
    assert all(record["AUC n/a"] == "1" for record in records)


def test_box_plots_and_overlay_grid_written(tmp_path):
    import matplotlib.pyplot as pyplot

    figures_before = pyplot.get_fignums()
    paths = reports.write_box_plots(tmp_path, _hand_rows())
    assert [path.name for path in paths] == ["boxplot_iou.png", "boxplot_dice.png", "boxplot_auc.png"]
    y = _reference_mask()
    example = reports.OverlayExample("case", y, ndimage.binary_erosion(y))
    grid = reports.write_overlay_grid(tmp_path / "grid.png", [example])
    assert Image.open(grid).size[0] > 100
    assert pyplot.get_fignums() == figures_before


def test_select_examples_best_median_worst():
    rows = [
        evaluation.EvaluationRow(f"{name}.png", "", "", "m", "s", dice_value, dice_value, None, True)
        for name, dice_value in (("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.7), ("e", 0.1))
    ]
    picks = [(label, row.image) for label, row in reports.select_examples(rows)]
    assert picks == [("best", "b.png"), ("median", "c.png"), ("worst", "e.png")]


# --------------------------------------------------------------------------------------------------------------------
# `medclipsam evaluate --predictions`


def _eroded_case_folders(shared_data: Path, tmp_path: Path) -> tuple[Path, Path, Path, dict[str, float]]:
    """Copy BUSI masks, write eroded predictions and distance score maps; return folders and expected Dice."""
    masks = tmp_path / "masks"
    predictions = tmp_path / "predictions"
    scores = tmp_path / "scores"
    for folder in (masks, predictions, scores):
        folder.mkdir()
    expected = {}
    for name in BUSI_NAMES:
        source = shared_data / "breast_ultrasound" / "masks" / f"{name}_mask.png"
        shutil.copy(source, masks / source.name)
        truth = np.asarray(Image.open(source).convert("L")) > 0
        eroded = ndimage.binary_erosion(truth, iterations=3)
        Image.fromarray(eroded.astype(np.uint8) * 255).save(predictions / f"{name}_pred.png")
        distance = ndimage.distance_transform_edt(truth)
        score = np.clip(distance * 8.0, 0, 255).astype(np.uint8)
        Image.fromarray(score).save(scores / f"{name}_score.png")
        expected[f"{name}_pred.png"] = 2.0 * eroded.sum() / (eroded.sum() + truth.sum())
    return predictions, masks, scores, expected


def test_cli_predictions_mode_expected_dice(shared_data, tmp_path):
    predictions, masks, scores, expected = _eroded_case_folders(shared_data, tmp_path)
    output = tmp_path / "report"
    images = tmp_path / "images"
    images.mkdir()
    for name in BUSI_NAMES:
        shutil.copy(shared_data / "breast_ultrasound" / "images" / f"{name}.png", images)
    code, stdout, stderr = _run_cli(
        ["evaluate", "--predictions", str(predictions), "--masks", str(masks), "--scores", str(scores),
         "--images", str(images), "--output", str(output), "--name", "eroded"]
    )  # fmt: skip
    assert code == 0, stderr
    rows = reports.read_rows_csv(output / "per_image.csv")
    assert {row.image: pytest.approx(row.dice) for row in rows} == expected
    # The distance map is 0 outside the ground truth and > 0 inside it, so it separates the classes exactly.
    assert all(row.auc == pytest.approx(1.0) for row in rows)
    assert (output / "summary.md").is_file()
    assert (output / "overlays.png").is_file()


def test_evaluate_predictions_folders_library_call(shared_data, tmp_path):
    predictions, masks, _, expected = _eroded_case_folders(shared_data, tmp_path)
    rows = evaluation.evaluate_predictions(predictions, masks, method="resunet")
    assert {row.image: pytest.approx(row.dice) for row in rows} == expected
    assert {row.method for row in rows} == {"resunet"}


def test_float_nrrd_score_map_auc(tmp_path):
    from MedCLIPSAMLib.io import write_nrrd

    generator = np.random.default_rng(9)
    y = np.zeros((20, 24), dtype=np.uint8)
    y[4:12, 6:18] = 1
    scores = (generator.random((20, 24)) + 0.6 * y).astype(np.float32)
    path = write_nrrd(tmp_path / "case_score.nrrd", scores)
    rows = evaluation.evaluate_predictions([evaluation.PredictionCase("case", y, y, score_map=path)])
    assert rows[0].auc == pytest.approx(roc_auc_score(y.ravel(), scores.ravel()))


def test_cli_predictions_without_scores_auc_na(shared_data, tmp_path):
    predictions, masks, _, _ = _eroded_case_folders(shared_data, tmp_path)
    output = tmp_path / "report"
    code, _, stderr = _run_cli(
        ["evaluate", "--predictions", str(predictions), "--masks", str(masks), "--output", str(output)]
    )
    assert code == 0, stderr
    rows = reports.read_rows_csv(output / "per_image.csv")
    assert all(row.auc is None for row in rows)
    assert ",n/a," in (output / "per_image.csv").read_text(encoding="utf-8")


def test_cli_predictions_shape_mismatch_fails(tmp_path):
    _touch_png(tmp_path / "predictions" / "a.png", (10, 10))
    _touch_png(tmp_path / "masks" / "a_mask.png", (10, 12))
    code, _, stderr = _run_cli(
        ["evaluate", "--predictions", str(tmp_path / "predictions"), "--masks", str(tmp_path / "masks"),
         "--output", str(tmp_path / "report")]
    )  # fmt: skip
    assert code == 1
    assert "(10, 12)" in stderr


def test_cli_requires_prompt_in_zero_shot_mode(tmp_path):
    code, _, stderr = _run_cli(
        ["evaluate", "--images", str(tmp_path), "--masks", str(tmp_path), "--output", str(tmp_path / "out")]
    )
    assert code == 2
    assert "--prompt" in stderr


# --------------------------------------------------------------------------------------------------------------------
# `medclipsam evaluate` zero-shot on real images with tiny models


@pytest.fixture(scope="module")
def busi_run(shared_data, tiny_clip_id, tiny_sam_checkpoint, tmp_path_factory):
    """Zero-shot run on 3 BUSI images, 2 prompts (one unrelated), gScoreCAM and GradCAM, plus unmatched files."""
    root = tmp_path_factory.mktemp("busi_eval")
    images = root / "images"
    masks = root / "masks"
    images.mkdir()
    masks.mkdir()
    for name in BUSI_NAMES:
        shutil.copy(shared_data / "breast_ultrasound" / "images" / f"{name}.png", images)
        shutil.copy(shared_data / "breast_ultrasound" / "masks" / f"{name}_mask.png", masks)
    # A second lesion mask of the first image in BUSI's naming: it must join the first mask.
    first = np.asarray(Image.open(masks / f"{BUSI_NAMES[0]}_mask.png").convert("L"))
    extra = np.zeros_like(first)
    extra[5:25, 5:25] = 255
    Image.fromarray(extra).save(masks / f"{BUSI_NAMES[0]}_mask_1.png")
    shutil.copy(images / f"{BUSI_NAMES[1]}.png", images / "no mask here.png")
    _touch_png(masks / "orphan_mask.png")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("# prompts\nbreast tumor\n\nred car\n", encoding="utf-8")
    output = root / "report"
    code, stdout, stderr = _run_cli(
        ["evaluate", "--images", str(images), "--masks", str(masks), "--prompts-file", str(prompts_file),
         "--output", str(output), "--compare", "gradcam", "--clip", tiny_clip_id, "--sam-type", "tiny",
         "--sam-checkpoint", str(tiny_sam_checkpoint), "--top-k", "8", "--device", "cpu"]
    )  # fmt: skip
    return {"code": code, "stdout": stdout, "stderr": stderr, "output": output, "images": images, "masks": masks}


def test_zero_shot_cli_succeeds(busi_run):
    assert busi_run["code"] == 0, busi_run["stderr"]


def test_zero_shot_cli_writes_outputs(busi_run):
    output = busi_run["output"]
    for name in ("per_image.csv", "summary.md", "prompt_sensitivity.csv", "overlays.png"):
        assert (output / name).is_file(), name
    for metric in ("iou", "dice", "auc"):
        assert (output / f"boxplot_{metric}.png").is_file(), metric


def test_zero_shot_csv_rows_per_stage(busi_run):
    rows = reports.read_rows_csv(busi_run["output"] / "per_image.csv")
    # 3 images x 2 prompts x 2 methods x 2 stages.
    assert len(rows) == 24
    assert {row.stage for row in rows} == {evaluation.STAGE_CRF, evaluation.STAGE_SAM}
    assert {row.method for row in rows} == {"gscorecam", "gradcam"}
    assert {row.prompt for row in rows} == {"breast tumor", "red car"}


def test_zero_shot_joins_mask_1_file(busi_run):
    rows = reports.read_rows_csv(busi_run["output"] / "per_image.csv")
    first = next(row for row in rows if row.image == f"{BUSI_NAMES[0]}.png")
    assert first.mask == f"{BUSI_NAMES[0]}_mask.png;{BUSI_NAMES[0]}_mask_1.png"


def test_zero_shot_reports_unmatched_files(busi_run):
    assert "no mask here.png" in busi_run["stderr"]
    assert "orphan_mask.png" in busi_run["stderr"]
    summary = (busi_run["output"] / "summary.md").read_text(encoding="utf-8")
    assert "no mask for `no mask here.png`" in summary
    assert "no image for mask `orphan_mask.png`" in summary


def test_zero_shot_csv_metrics_match_saved_masks(busi_run):
    rows = reports.read_rows_csv(busi_run["output"] / "per_image.csv")
    row = next(row for row in rows if row.method == "gscorecam" and row.stage == evaluation.STAGE_SAM)
    stem = row.image[: -len(".png")]
    saved = busi_run["output"] / "masks" / "gscorecam" / "00_breast_tumor" / f"{stem}_sam.png"
    y_pred = np.asarray(Image.open(saved).convert("L")) > 0
    y = np.zeros_like(y_pred)
    for mask_name in row.mask.split(";"):
        y |= np.asarray(Image.open(busi_run["masks"] / mask_name).convert("L")) > 0
    from sklearn.metrics import f1_score

    expected = 1.0 if not (y.any() or y_pred.any()) else f1_score(y.ravel(), y_pred.ravel(), zero_division=0.0)
    assert row.dice == pytest.approx(expected)


def _format_percent(mean: float, std: float) -> str:
    return f"{100.0 * mean:.2f} {PLUS_MINUS} {100.0 * std:.2f}"


def test_zero_shot_table_matches_csv_recomputation(busi_run):
    rows = reports.read_rows_csv(busi_run["output"] / "per_image.csv")
    summary = (busi_run["output"] / "summary.md").read_text(encoding="utf-8")
    records = _markdown_table(summary, "method")
    assert len(records) == 8
    for record in records:
        group = [
            row
            for row in rows
            if (row.method, row.stage, row.prompt) == (record["method"], record["stage"], record["prompt"])
        ]
        assert record["n"] == str(len(group))
        for metric, title in (("iou", "IoU"), ("dice", "DSC")):
            values = np.asarray([getattr(row, metric) for row in group])
            std = values.std(ddof=1)
            assert record[f"{title} (%)"] == _format_percent(values.mean(), std), (record, metric)
            half = stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
            if std > 0:
                interval = f"[{100 * (values.mean() - half):.2f}, {100 * (values.mean() + half):.2f}]"
                assert record[f"{title} 95% CI"] == interval


def test_zero_shot_ttest_matches_scipy_on_csv(busi_run):
    rows = reports.read_rows_csv(busi_run["output"] / "per_image.csv")
    summary = (busi_run["output"] / "summary.md").read_text(encoding="utf-8")
    records = _markdown_table(summary, "metric")
    stage = evaluation.STAGE_SAM
    tested = 0
    for metric, title in (("iou", "IoU"), ("dice", "DSC"), ("auc", "AUC")):
        record = next(
            item
            for item in records
            if item["metric"] == title and item["first"] == f"gscorecam / {stage} / breast tumor"
        )
        assert record["second"] == f"gradcam / {stage} / breast tumor"

        def column(method):
            selected = [row for row in rows if (row.method, row.stage, row.prompt) == (method, stage, "breast tumor")]
            return {row.image: getattr(row, metric) for row in selected}

        first, second = column("gscorecam"), column("gradcam")
        images = [name for name in first if first[name] is not None and second[name] is not None]
        a = [first[name] for name in images]
        b = [second[name] for name in images]
        differences = np.subtract(a, b)
        if len(images) < 2 or np.ptp(differences) == 0:
            assert record["p"] == "n/a"
        else:
            assert record["p"] == f"{stats.ttest_rel(a, b).pvalue:.4g}"
            tested += 1
    # The tiny models are seeded, so at least one metric differs between the methods in a way t can measure.
    assert tested > 0


def test_zero_shot_prompt_sensitivity_rows(busi_run):
    text = (busi_run["output"] / "prompt_sensitivity.csv").read_text(encoding="utf-8").splitlines()
    # Header plus 3 images x 2 methods x 1 prompt pair.
    assert len(text) == 1 + 6
    summary = (busi_run["output"] / "summary.md").read_text(encoding="utf-8")
    records = _markdown_table(summary, "method | prompt A")
    assert {record["method"] for record in records} == {"gscorecam", "gradcam"}


@pytest.fixture(scope="module")
def chest_run(shared_data, tiny_clip_id, tiny_sam_checkpoint, tmp_path_factory):
    """Zero-shot run on 2 chest X-rays with one prompt, plus a constant image and one whose mask has another size."""
    root = tmp_path_factory.mktemp("chest_eval")
    images = root / "images"
    masks = root / "masks"
    for name in CHEST_NAMES:
        images.mkdir(exist_ok=True)
        shutil.copy(shared_data / "chest_xray" / "images" / name, images)
        masks.mkdir(exist_ok=True)
        shutil.copy(shared_data / "chest_xray" / "masks" / f"{Path(name).stem}_mask.png", masks)
    _touch_png(images / "constant.png", (64, 64))
    _touch_png(masks / "constant_mask.png", (64, 64))
    _touch_png(images / "wrong size.png", (64, 64))
    _touch_png(masks / "wrong size_mask.png", (64, 80))
    output = root / "report"
    code, stdout, stderr = _run_cli(
        ["evaluate", "--images", str(images), "--masks", str(masks), "--prompt", "lungs", "--output", str(output),
         "--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
         "--top-k", "8", "--device", "cpu"]
    )  # fmt: skip
    return {"code": code, "stdout": stdout, "stderr": stderr, "output": output}


def test_zero_shot_chest_rows_for_usable_images(chest_run):
    rows = reports.read_rows_csv(chest_run["output"] / "per_image.csv")
    assert sorted({row.image for row in rows}) == sorted(CHEST_NAMES)
    assert len(rows) == 2 * len(CHEST_NAMES)
    assert not (chest_run["output"] / "prompt_sensitivity.csv").exists()
    assert "DSC (%)" in chest_run["stdout"]


def test_zero_shot_failed_images_reported(chest_run):
    assert chest_run["code"] == 1
    assert "constant.png" in chest_run["stderr"]
    assert "(64, 80)" in chest_run["stderr"]
    summary = (chest_run["output"] / "summary.md").read_text(encoding="utf-8")
    assert "## Failed images" in summary
    assert "`wrong size.png`" in summary

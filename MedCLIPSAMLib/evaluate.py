"""Evaluation of segmentations against ground-truth masks: pairing files, scoring and statistics.

Two entry points produce per-image rows (`EvaluationRow`), which every report is computed from:

* `evaluate_zero_shot` runs `ZeroShotSegmenter` on image/mask pairs for one or more prompts and saliency methods,
  and scores the two pipeline stages for which the MedCLIP-SAM paper (Koleilat et al., MICCAI 2024,
  arXiv 2403.20253) reports zero-shot results:

  - ``saliency + CRF``: the coarse mask of the dense CRF (IoU, Dice) and the saliency map (AUC);
  - ``saliency + SAM``: the final SAM mask (IoU, Dice) and the SAM-gated saliency of `sam_stage_score_map` (AUC).
    The gated map ranks every pixel inside the SAM mask above every pixel outside it and orders the pixels of each
    side by saliency. So this AUC measures the final mask and still rewards a good saliency ranking on both sides.
    Scoring the plain saliency map again would repeat the CRF stage's AUC, and the bare binary mask would
    reduce the AUC to balanced accuracy.

  With several prompts it also measures prompt sensitivity (`PromptSensitivityRow`): per image and pair of prompts,
  the Pearson correlation of the saliency maps and the Dice overlap of the masks.

* `evaluate_predictions` scores existing binary masks from any tool (IoU, Dice, and AUC when a continuous score map
  is given).

The CSV files, Markdown tables and figures computed from these rows are in `MedCLIPSAMLib.reports`.

Metric conventions (binarisation > 0, empty masks, undefined AUC) are those of `MedCLIPSAMLib.metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from .errors import CancelledError, InvalidInputError
from .metrics import dice, iou, paired_ttest, pearson_correlation, pixel_auc, summarize

__all__ = [
    "CSV_COLUMNS",
    "METRICS",
    "PREDICTION_NAME_SUFFIXES",
    "SCORE_NAME_SUFFIXES",
    "STAGE_CRF",
    "STAGE_MASK",
    "STAGE_SAM",
    "ComparisonRow",
    "EvaluationRow",
    "ImageMaskPair",
    "PairingResult",
    "PredictionCase",
    "PromptSensitivityRow",
    "SummaryRow",
    "ZeroShotEvaluation",
    "compare_methods",
    "compare_stages",
    "evaluate_predictions",
    "evaluate_zero_shot",
    "pair_images_and_masks",
    "pair_predictions_and_masks",
    "prediction_cases_from_dirs",
    "read_ground_truth",
    "read_mask",
    "read_score_map",
    "sam_stage_score_map",
    "summarize_prompt_sensitivity",
    "summarize_rows",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]

STAGE_CRF = "saliency + CRF"
"""Stage label of the coarse mask (dense CRF on the saliency map)."""
STAGE_SAM = "saliency + SAM"
"""Stage label of the final mask (SAM prompted with the boxes of the coarse mask)."""
STAGE_MASK = "mask"
"""Stage label of externally produced masks scored by `evaluate_predictions`."""

METRICS = ("iou", "dice", "auc")
"""Per-image metric columns, in report order."""

CSV_COLUMNS = ("image", "mask", "prompt", "method", "stage", "iou", "dice", "auc", "found", "seconds")
"""Columns of the per-image CSV file, in order."""

NOT_AVAILABLE = "n/a"
"""Text that reports write for a value that is undefined (AUC of a one-class ground truth) or not measured."""

IMAGE_FILE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nrrd", ".nii", ".nii.gz", ".mha", ".mhd",
)  # fmt: skip
"""File name endings (case-insensitive) that pairing considers; other files in the folders are ignored."""

PREDICTION_NAME_SUFFIXES = ("_mask", "_pred", "_prediction", "_seg", "_segmentation", "_label")
"""Name endings stripped from prediction file names when no ground truth matches the full name."""

SCORE_NAME_SUFFIXES = ("_score", "_scores", "_saliency", "_prob", "_probability", "_probabilities", "_map")
"""Name endings stripped from score-map file names when no prediction matches the full name."""

SAM_STAGE_SALIENCY_WEIGHT = 0.5
"""Weight of the saliency in `sam_stage_score_map` (mask + weight * saliency). Any weight in (0, 1) gives the same
ranking, hence the same AUC, because a saliency in [0, 1] can then never lift an outside pixel above an inside one."""



# --------------------------------------------------------------------------------------------------------------------
# Pairing files by name


@dataclass(frozen=True)
class ImageMaskPair:
    """One image (or prediction) file and the ground-truth mask files that belong to it.

    Attributes:
        image: path of the image or prediction file.
        masks: paths of its mask files, sorted; the ground truth is their union (BUSI stores several lesions of one
            image as ``<stem>_mask.png``, ``<stem>_mask_1.png``, ...).
    """

    image: Path
    masks: tuple[Path, ...]

    @property
    def name(self) -> str:
        """File name of the image, as reported in the ``image`` column."""
        return self.image.name

    @property
    def mask_names(self) -> str:
        """File names of the masks joined by ";", as reported in the ``mask`` column."""
        return ";".join(path.name for path in self.masks)


@dataclass
class PairingResult:
    """Outcome of pairing two folders by file name.

    Attributes:
        pairs: matched files, sorted by image name (numbers in names compare as numbers).
        unmatched_images: images (or predictions) without any mask.
        unmatched_masks: masks that belong to no image.
        ignored_files: files whose name ending is not in `IMAGE_FILE_SUFFIXES` (and hidden files are skipped
            without being listed).
    """

    pairs: list[ImageMaskPair]
    unmatched_images: list[Path] = field(default_factory=list)
    unmatched_masks: list[Path] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)


def _natural_key(name: str) -> list:
    """Sort key that orders "benign (2)" before "benign (10)"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _split_name(path: Path) -> tuple[str, str]:
    """Split a file name into (stem, suffix) with the two-part ending ".nii.gz" kept whole."""
    lower = path.name.lower()
    for suffix in IMAGE_FILE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)], path.name[-len(suffix) :]
    return path.stem, path.suffix


def _list_files(folder: str | Path, role: str) -> tuple[list[Path], list[Path]]:
    """Return (supported files, ignored files) of a folder, sorted naturally; raise when the folder is missing."""
    directory = Path(folder)
    if not directory.is_dir():
        raise InvalidInputError(f"The {role} folder {str(directory)!r} does not exist or is not a folder.")
    supported: list[Path] = []
    ignored: list[Path] = []
    for path in directory.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        lower = path.name.lower()
        if any(lower.endswith(suffix) and len(lower) > len(suffix) for suffix in IMAGE_FILE_SUFFIXES):
            supported.append(path)
        else:
            ignored.append(path)
    supported.sort(key=lambda path: _natural_key(path.name))
    ignored.sort(key=lambda path: _natural_key(path.name))
    return supported, ignored


def _strip_suffixes(stem: str, suffixes: Sequence[str]) -> list[str]:
    """Return the stems left after removing each suffix of `suffixes` that `stem` ends with."""
    return [stem[: -len(suffix)] for suffix in suffixes if stem.endswith(suffix) and len(stem) > len(suffix)]


def _name_lookup(files: Sequence[Path], alias_suffixes: Sequence[str], role: str) -> dict[str, Path]:
    """Map name keys to files: each file's own stem, plus its stem without one of `alias_suffixes`.

    Own stems take precedence over aliases, so a file named exactly like the key always wins.
    """
    by_stem: dict[str, Path] = {}
    for path in files:
        stem = _split_name(path)[0]
        if stem in by_stem:
            raise InvalidInputError(
                f"The {role} files {by_stem[stem].name!r} and {path.name!r} have the same name {stem!r}, so files "
                "cannot be paired with them by name; rename or remove one."
            )
        by_stem[stem] = path
    aliases: dict[str, Path] = {}
    for stem, path in by_stem.items():
        for key in _strip_suffixes(stem, alias_suffixes):
            if key in by_stem:
                continue
            if key in aliases and aliases[key] != path:
                raise InvalidInputError(
                    f"The {role} files {aliases[key].name!r} and {path.name!r} both match the name {key!r}; keep one."
                )
            aliases[key] = path
    return {**aliases, **by_stem}


def _mask_keys(mask: Path) -> list[str]:
    """Image stems a mask file may belong to, most specific first: its own stem, then the stem before a trailing
    ``_mask`` or ``_mask_<n>`` (BUSI names extra lesion masks of one image ``<stem>_mask_1``, ``<stem>_mask_2``)."""
    stem = _split_name(mask)[0]
    keys = [stem]
    match = re.fullmatch(r"(.+?)_mask(?:_\d+)?", stem)
    if match:
        keys.append(match.group(1))
    return keys


def _pair_files(primary: Sequence[Path], masks: Sequence[Path], alias_suffixes: Sequence[str], role: str):
    lookup = _name_lookup(primary, alias_suffixes, role)
    assigned: dict[Path, list[Path]] = {path: [] for path in primary}
    unmatched_masks: list[Path] = []
    for mask in masks:
        for key in _mask_keys(mask):
            if key in lookup:
                assigned[lookup[key]].append(mask)
                break
        else:
            unmatched_masks.append(mask)
    pairs = [ImageMaskPair(path, tuple(found)) for path, found in assigned.items() if found]
    unmatched_primary = [path for path, found in assigned.items() if not found]
    return pairs, unmatched_primary, unmatched_masks


def _log_pairing(result: PairingResult, role: str) -> None:
    if result.unmatched_images:
        names = ", ".join(path.name for path in result.unmatched_images)
        logger.warning("%d %s files have no mask and are not evaluated: %s", len(result.unmatched_images), role, names)
    if result.unmatched_masks:
        names = ", ".join(path.name for path in result.unmatched_masks)
        logger.warning("%d mask files match no %s file: %s", len(result.unmatched_masks), role, names)


def pair_images_and_masks(images_dir: str | Path, masks_dir: str | Path) -> PairingResult:
    """Pair image files with their ground-truth mask files by file name, never by listing order.

    A mask belongs to the image whose stem (name without its ending) equals the mask's stem, or, failing that, the
    mask's stem without a trailing ``_mask`` or ``_mask_<n>``. So ``a.png`` pairs with ``a.png``, ``a.tif``,
    ``a_mask.png`` and ``a_mask_1.png`` in the masks folder, and all of them form one ground truth (their union).
    Endings may differ (``a.jpg`` with ``a_mask.png``). Name matching is case-sensitive. When both arguments are
    the same folder, files named ``<stem>_mask*`` are the masks and all other files the images.

    Args:
        images_dir: folder of images (PNG, JPEG, TIFF, BMP, DICOM, NRRD, NIfTI, MHA).
        masks_dir: folder of ground-truth masks.

    Returns:
        PairingResult with the pairs and the unmatched images and masks (also logged as warnings).

    Raises:
        InvalidInputError: when a folder is missing, or two images share a stem (``a.png`` and ``a.jpg``).
    """
    images, ignored_images = _list_files(images_dir, "images")
    if Path(images_dir).resolve() == Path(masks_dir).resolve():
        # One folder holding both, as in the BUSI download: files named like masks are masks, the rest images.
        masks = [path for path in images if len(_mask_keys(path)) > 1]
        images = [path for path in images if len(_mask_keys(path)) == 1]
        ignored_masks: list[Path] = []
    else:
        masks, ignored_masks = _list_files(masks_dir, "masks")
    pairs, unmatched_images, unmatched_masks = _pair_files(images, masks, (), "image")
    result = PairingResult(pairs, unmatched_images, unmatched_masks, ignored_images + ignored_masks)
    _log_pairing(result, "image")
    return result


def pair_predictions_and_masks(predictions_dir: str | Path, masks_dir: str | Path) -> PairingResult:
    """Pair predicted mask files with ground-truth mask files by file name.

    Same rules as `pair_images_and_masks`, and in addition a prediction named ``<stem>_pred``, ``<stem>_mask``,
    ``<stem>_seg`` (see `PREDICTION_NAME_SUFFIXES`) matches the ground truth of ``<stem>`` when no ground truth has
    the prediction's full name. The ``image`` attribute of each pair is the prediction file.
    """
    predictions, ignored_predictions = _list_files(predictions_dir, "predictions")
    masks, ignored_masks = _list_files(masks_dir, "masks")
    pairs, unmatched_predictions, unmatched_masks = _pair_files(
        predictions, masks, PREDICTION_NAME_SUFFIXES, "prediction"
    )
    result = PairingResult(pairs, unmatched_predictions, unmatched_masks, ignored_predictions + ignored_masks)
    _log_pairing(result, "prediction")
    return result


# --------------------------------------------------------------------------------------------------------------------
# Reading masks and score maps


def _read_array(path: str | Path) -> np.ndarray:
    from .io import read_image

    return np.asarray(read_image(path))


def _mask_from_array(array: np.ndarray, source: str) -> np.ndarray:
    """Binarise a label image: [H, W] or [H, W, C] -> [H, W] bool, foreground where any colour channel is > 0."""
    if array.ndim == 2:
        return array > 0
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        channels = array.shape[2]
        # Alpha (the last channel of gray+alpha and RGBA) is opacity, not a label, so it is left out.
        colour = array[..., :1] if channels == 2 else array[..., :3]
        return (colour > 0).any(axis=2)
    raise InvalidInputError(
        f"Mask {source} has shape {array.shape}; expected [H, W] or [H, W, C] with C in 1-4 (gray, RGB, RGBA)."
    )


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask file as [H, W] bool.

    Accepted encodings: 0/255 and 0/1 gray, 1-bit PNG (PIL mode "1"), and colour masks where a pixel is foreground
    when any colour channel is > 0 (an alpha channel is ignored). Any format `MedCLIPSAMLib.io.read_image` reads.

    Raises:
        InvalidInputError: when the file cannot be read or is not a 2D image.
    """
    return _mask_from_array(_read_array(path), repr(str(path)))


def read_ground_truth(pair: ImageMaskPair) -> np.ndarray:
    """Read the ground truth of a pair: the union of its mask files, [H, W] bool.

    Raises:
        InvalidInputError: when the mask files of one image have different shapes.
    """
    union: np.ndarray | None = None
    for path in pair.masks:
        mask = read_mask(path)
        if union is None:
            union = mask
        elif mask.shape != union.shape:
            raise InvalidInputError(
                f"The masks of {pair.name!r} differ in size: {pair.masks[0].name!r} has shape {union.shape} and "
                f"{path.name!r} has shape {mask.shape}; all masks of one image must have its size."
            )
        else:
            union |= mask
    if union is None:
        raise InvalidInputError(f"{pair.name!r} has no mask files.")
    return union


def read_score_map(path: str | Path) -> np.ndarray:
    """Read a continuous score map (saliency, probability) as [H, W] float64.

    Float NRRD/NIfTI/TIFF maps are read as stored, and 8- or 16-bit PNG maps as their integer values. The scale does
    not matter because the AUC uses only the order of the values. A colour file is accepted only when its colour
    channels are equal (a gray map saved as RGB).

    Raises:
        InvalidInputError: when the map has several different channels or non-finite values.
    """
    array = _read_array(path)
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        colour = array[..., :1] if array.shape[2] == 2 else array[..., :3]
        if not (colour == colour[..., :1]).all():
            raise InvalidInputError(
                f"Score map {str(path)!r} has {colour.shape[2]} different colour channels; save the map as a "
                "single-channel image (gray PNG, float NRRD or TIFF)."
            )
        array = colour[..., 0]
    if array.ndim != 2:
        raise InvalidInputError(f"Score map {str(path)!r} has shape {array.shape}; expected a 2D map [H, W].")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInputError(f"Score map {str(path)!r} contains NaN or infinite values; replace them first.")
    return values


def sam_stage_score_map(mask: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """Build the continuous map whose pixel AUC is reported for the ``saliency + SAM`` stage.

    score = mask + `SAM_STAGE_SALIENCY_WEIGHT` * saliency: every pixel inside the SAM mask ranks above every pixel
    outside it, and the saliency orders the pixels within each side.

    Args:
        mask: [H, W] final mask, foreground where > 0.
        saliency: [H, W] float saliency in [0, 1].

    Returns:
        [H, W] float64 in [0, 1.5].
    """
    mask = np.asarray(mask)
    saliency = np.asarray(saliency)
    if mask.shape != saliency.shape:
        raise InvalidInputError(f"mask has shape {mask.shape} but saliency has shape {saliency.shape}.")
    return (mask > 0).astype(np.float64) + SAM_STAGE_SALIENCY_WEIGHT * np.clip(saliency.astype(np.float64), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Per-image rows


@dataclass
class EvaluationRow:
    """Scores of one image for one prompt, method and stage (one line of the per-image CSV).

    Attributes:
        image: file name of the image (or of the prediction in `evaluate_predictions`).
        mask: file names of the ground-truth masks, joined by ";".
        prompt: text prompt; empty for external predictions.
        method: saliency method ("gscorecam", "gradcam") or the name given to external predictions.
        stage: `STAGE_CRF`, `STAGE_SAM` or `STAGE_MASK`.
        iou, dice: overlap of the stage's binary mask with the ground truth, in [0, 1].
        auc: pixel ROC AUC in [0, 1]; None when undefined (one-class ground truth) or when no map was given.
        found: True when the stage's mask is not empty.
        seconds: wall-clock seconds the pipeline needed to reach this stage's output; None when not measured.
    """

    image: str
    mask: str
    prompt: str
    method: str
    stage: str
    iou: float
    dice: float
    auc: float | None
    found: bool
    seconds: float | None = None

    def metric(self, name: str) -> float | None:
        """Return the value of metric `name` ("iou", "dice" or "auc")."""
        return getattr(self, name)


def _score(
    y_pred: np.ndarray, y: np.ndarray, score_map: np.ndarray | None, context: str
) -> tuple[float, float, float | None]:
    """Return (IoU, Dice, AUC) of one case; errors get `context` (file names) prepended."""
    try:
        auc = pixel_auc(score_map, y) if score_map is not None else None
        return iou(y_pred, y), dice(y_pred, y), auc
    except InvalidInputError as error:
        raise InvalidInputError(f"{context}: {error}") from error


def _check_cancel(cancel: CancelCallback | None, done: int, total: int) -> None:
    if cancel is not None and cancel():
        raise CancelledError(f"Evaluation cancelled after {done} of {total} steps.")


# --------------------------------------------------------------------------------------------------------------------
# Scoring existing predictions


@dataclass
class PredictionCase:
    """One prediction to score.

    Attributes:
        image: name reported in the ``image`` column.
        y_pred: predicted mask [H, W] (foreground where > 0) or the path of a mask file.
        y: ground-truth mask [H, W], a mask file path, or several paths whose union is the ground truth.
        score_map: optional continuous map [H, W] (probability, saliency) or its file path; it gives the AUC.
        mask_name: name reported in the ``mask`` column; defaults to the ground-truth file names.
    """

    image: str
    y_pred: np.ndarray | str | Path
    y: np.ndarray | str | Path | Sequence[str | Path]
    score_map: np.ndarray | str | Path | None = None
    mask_name: str = ""


def _as_mask(value, role: str) -> np.ndarray:
    if isinstance(value, (str, Path)):
        return read_mask(value)
    if isinstance(value, np.ndarray):
        return _mask_from_array(value, role)
    paths = [Path(item) for item in value]
    if not paths:
        raise InvalidInputError(f"The {role} is an empty list of mask files; give at least one mask.")
    return read_ground_truth(ImageMaskPair(paths[0], tuple(paths)))


def _mask_label(value) -> str:
    if isinstance(value, (str, Path)):
        return Path(value).name
    if isinstance(value, np.ndarray):
        return ""
    return ";".join(Path(item).name for item in value)


def _find_score_file(keys: Sequence[str], lookup: dict[str, Path]) -> Path | None:
    for key in keys:
        if key in lookup:
            return lookup[key]
    return None


def prediction_cases_from_dirs(
    predictions_dir: str | Path, masks_dir: str | Path, scores_dir: str | Path | None = None
) -> tuple[list[PredictionCase], PairingResult]:
    """Pair prediction files with ground truths (and optional score maps) by name.

    Score maps pair with a prediction when their stem, with or without one of `SCORE_NAME_SUFFIXES`, equals the
    prediction's stem, the prediction's stem without one of `PREDICTION_NAME_SUFFIXES`, or the image stem of its
    ground truth. Predictions without a score map get AUC None.

    Returns:
        (cases, pairing) where pairing lists the unmatched predictions and masks.
    """
    pairing = pair_predictions_and_masks(predictions_dir, masks_dir)
    score_lookup: dict[str, Path] = {}
    if scores_dir is not None:
        score_files, _ = _list_files(scores_dir, "scores")
        score_lookup = _name_lookup(score_files, SCORE_NAME_SUFFIXES, "score map")
    cases: list[PredictionCase] = []
    missing_scores: list[str] = []
    for pair in pairing.pairs:
        score_file = None
        if scores_dir is not None:
            stem = _split_name(pair.image)[0]
            keys = [stem, *_strip_suffixes(stem, PREDICTION_NAME_SUFFIXES), *_mask_keys(pair.masks[0])[1:]]
            score_file = _find_score_file(keys, score_lookup)
            if score_file is None:
                missing_scores.append(pair.name)
        cases.append(PredictionCase(pair.name, pair.image, pair.masks, score_file, pair.mask_names))
    if missing_scores:
        logger.warning(
            "%d predictions have no score map, so their AUC is n/a: %s", len(missing_scores), ", ".join(missing_scores)
        )
    return cases, pairing


def evaluate_predictions(
    predictions: str | Path | Sequence[PredictionCase | tuple],
    masks_dir: str | Path | None = None,
    scores_dir: str | Path | None = None,
    *,
    method: str = "predictions",
    stage: str = STAGE_MASK,
    prompt: str = "",
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> list[EvaluationRow]:
    """Score existing binary masks from any tool against the ground truth.

    Predictions are binarised as > 0, so threshold a probability map first (``y_pred = probability > 0.5``) and pass
    the probability itself as the score map to get its AUC.

    Args:
        predictions: a folder of predicted mask files (then `masks_dir` is required and files pair by name as in
            `pair_predictions_and_masks`), or a sequence of `PredictionCase` or tuples
            ``(image_name, y_pred, y)`` / ``(image_name, y_pred, y, score_map)`` with arrays or file paths.
        masks_dir: ground-truth folder, for folder input only.
        scores_dir: optional folder of continuous score maps (float NRRD, TIFF or gray PNG) for the AUC, for folder
            input only.
        method: label for the ``method`` column, e.g. "resunet".
        stage: label for the ``stage`` column.
        prompt: label for the ``prompt`` column.
        progress: called as progress(done, total, message) after each image.
        cancel: polled before each image; returning True raises CancelledError.

    Returns:
        One `EvaluationRow` per prediction: IoU, Dice, AUC (None without a score map), found = prediction not
        empty, seconds None.

    Raises:
        InvalidInputError: missing folders, a prediction whose shape differs from its ground truth (no resizing).
        CancelledError: when `cancel` returns True.
    """
    if isinstance(predictions, (str, Path)):
        if masks_dir is None:
            raise InvalidInputError("evaluate_predictions needs masks_dir when predictions is a folder.")
        cases, _ = prediction_cases_from_dirs(predictions, masks_dir, scores_dir)
    else:
        if masks_dir is not None or scores_dir is not None:
            raise InvalidInputError(
                "masks_dir and scores_dir apply to folder input only; put the ground truth and score map into "
                "each PredictionCase instead."
            )
        cases = [case if isinstance(case, PredictionCase) else PredictionCase(*case) for case in predictions]

    rows: list[EvaluationRow] = []
    total = len(cases)
    for done, case in enumerate(cases):
        _check_cancel(cancel, done, total)
        y_pred = _as_mask(case.y_pred, f"prediction of {case.image!r}")
        y = _as_mask(case.y, f"ground truth of {case.image!r}")
        score_map = None
        if case.score_map is not None:
            score_map = (
                read_score_map(case.score_map) if isinstance(case.score_map, (str, Path)) else case.score_map
            )
        iou_value, dice_value, auc_value = _score(y_pred, y, score_map, f"Prediction {case.image!r}")
        rows.append(
            EvaluationRow(
                image=case.image,
                mask=case.mask_name or _mask_label(case.y),
                prompt=prompt,
                method=method,
                stage=stage,
                iou=iou_value,
                dice=dice_value,
                auc=auc_value,
                found=bool(y_pred.any()),
                seconds=None,
            )
        )
        if progress is not None:
            progress(done + 1, total, case.image)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Zero-shot run


@dataclass
class PromptSensitivityRow:
    """Change of one image's result between two prompts, for one saliency method.

    Attributes:
        image: image file name.
        method: saliency method.
        prompt_a, prompt_b: the two prompts, in the order given.
        saliency_pearson: Pearson correlation of the two saliency maps; None when either map is constant.
        coarse_dice: Dice between the two coarse (CRF) masks; 1 when both are empty.
        mask_dice: Dice between the two final (SAM) masks; 1 when both are empty.
    """

    image: str
    method: str
    prompt_a: str
    prompt_b: str
    saliency_pearson: float | None
    coarse_dice: float
    mask_dice: float


@dataclass
class ZeroShotEvaluation:
    """Result of `evaluate_zero_shot`.

    Attributes:
        rows: two rows (`STAGE_CRF`, `STAGE_SAM`) per image, method and prompt.
        sensitivity: one row per image, method and pair of prompts (empty with a single prompt).
        saved_masks: (image name, method, prompt, stage) -> path of the saved mask PNG, when masks were saved.
        failed: (image name, error message) of the images skipped with ``skip_failed=True``.
    """

    rows: list[EvaluationRow]
    sensitivity: list[PromptSensitivityRow]
    saved_masks: dict[tuple[str, str, str, str], Path] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _slug(text: str, max_length: int = 48) -> str:
    """File-name-safe form of a prompt or method: lower case, runs of other characters replaced by "_"."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_length] or "prompt"


def _stage_seconds(timings: dict, wall_seconds: float) -> tuple[float, float]:
    """Return (seconds to the coarse mask, seconds to the final mask) from the pipeline's stage timings."""
    to_coarse = sum(float(timings.get(stage, 0.0)) for stage in ("prepare", "saliency", "crf"))
    to_final = float(timings.get("total", wall_seconds))
    return to_coarse, to_final


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    cleaned = [prompt.strip() for prompt in prompts if isinstance(prompt, str)]
    if len(cleaned) != len(prompts) or not all(cleaned):
        raise InvalidInputError(f"Prompts must be non-empty strings, got {list(prompts)!r}.")
    if len(set(cleaned)) != len(cleaned):
        raise InvalidInputError(f"Prompts must be distinct, got {cleaned!r}; remove the repeated prompt.")
    return cleaned


def evaluate_zero_shot(
    pairs: Sequence[ImageMaskPair],
    prompts: Sequence[str],
    clip,
    sam_model,
    *,
    config=None,
    methods: Sequence[str] = ("gscorecam",),
    mask_output_dir: str | Path | None = None,
    skip_failed: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> ZeroShotEvaluation:
    """Run the zero-shot pipeline on image/mask pairs and score its coarse and final masks.

    Each image is read once; for every method and prompt, `ZeroShotSegmenter.segment` runs and two rows are
    recorded: `STAGE_CRF` (coarse mask; AUC of the saliency map) and `STAGE_SAM` (final mask; AUC of
    `sam_stage_score_map`). With two or more prompts, every pair of prompts is compared per image and method.

    Args:
        pairs: image/mask pairs, e.g. `pair_images_and_masks(...).pairs`.
        prompts: distinct, non-empty text prompts.
        clip: `MedCLIPSAMLib.models.ClipBundle`.
        sam_model: `segment_anything.modeling.Sam`.
        config: `ZeroShotConfig` for everything but the saliency method; None uses the defaults.
        methods: saliency methods to run, each a value of `ZeroShotConfig.saliency` ("gscorecam", "gradcam").
        mask_output_dir: when given, every coarse and final mask is saved as
            ``<dir>/<method>/<nn>_<prompt>/<image stem>_crf.png`` and ``..._sam.png``.
        skip_failed: when True, an image that raises InvalidInputError (unreadable file, size differing from its
            ground truth, constant image) is left out of every result and listed in `ZeroShotEvaluation.failed`.
            When False, the error propagates.
        progress: called as progress(done, total, message) after each segmentation.
        cancel: polled before each segmentation; returning True raises CancelledError.

    Raises:
        InvalidInputError: invalid prompts or methods. With skip_failed False, also an unreadable file, an image
            whose size differs from its ground truth or an image the pipeline rejects.
        CancelledError: when `cancel` returns True.
    """
    from .pipeline import ZeroShotConfig, ZeroShotSegmenter

    prompts = _check_prompts(prompts)
    if not methods or len(set(methods)) != len(methods):
        raise InvalidInputError(f"methods must be a non-empty list of distinct saliency methods, got {methods!r}.")
    base_config = config if config is not None else ZeroShotConfig()
    segmenters = {
        method: ZeroShotSegmenter(clip, sam_model, dataclasses.replace(base_config, saliency=method))
        for method in methods
    }
    output_root = Path(mask_output_dir) if mask_output_dir is not None else None
    prompt_folders = {prompt: f"{index:02d}_{_slug(prompt)}" for index, prompt in enumerate(prompts)}

    evaluation = ZeroShotEvaluation(rows=[], sensitivity=[])
    total = len(pairs) * len(methods) * len(prompts)
    for index, pair in enumerate(pairs):
        # The image's results are kept only when all its methods and prompts succeeded, so groups stay paired.
        image_result = ZeroShotEvaluation(rows=[], sensitivity=[])
        try:
            _evaluate_image(
                pair, prompts, segmenters, image_result, output_root, prompt_folders,
                index * len(methods) * len(prompts), total, progress, cancel,
            )  # fmt: skip
        except InvalidInputError as error:
            if not skip_failed:
                raise
            logger.warning("Skipped %s: %s", pair.name, error)
            evaluation.failed.append((pair.name, str(error)))
            continue
        evaluation.rows.extend(image_result.rows)
        evaluation.sensitivity.extend(image_result.sensitivity)
        evaluation.saved_masks.update(image_result.saved_masks)
    return evaluation


def _evaluate_image(
    pair: ImageMaskPair,
    prompts: Sequence[str],
    segmenters: dict,
    evaluation: ZeroShotEvaluation,
    output_root: Path | None,
    prompt_folders: dict[str, str],
    done: int,
    total: int,
    progress: ProgressCallback | None,
    cancel: CancelCallback | None,
) -> None:
    """Segment one image with every method and prompt, appending rows, sensitivity and saved masks to `evaluation`."""
    from .io import read_image, write_mask_png

    image = read_image(pair.image)
    y = read_ground_truth(pair)
    if tuple(image.shape[:2]) != y.shape:
        raise InvalidInputError(
            f"Image {pair.name!r} has size {tuple(image.shape[:2])} but its ground truth {pair.mask_names!r} has "
            f"size {y.shape}; masks are never resized, so provide masks of the image's size."
        )
    stem = _split_name(pair.image)[0]
    for method, segmenter in segmenters.items():
        outputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for prompt in prompts:
            _check_cancel(cancel, done, total)
            start = time.perf_counter()
            context = f"Image {pair.name!r}, method {method}, prompt {prompt!r}"
            try:
                result = segmenter.segment(image, prompt)
            except InvalidInputError as error:
                raise InvalidInputError(f"{context}: {error}") from error
            to_coarse, to_final = _stage_seconds(result.timings, time.perf_counter() - start)
            stages = (
                (STAGE_CRF, result.coarse_mask, result.saliency, bool(result.coarse_mask.any()), to_coarse),
                (STAGE_SAM, result.mask, sam_stage_score_map(result.mask, result.saliency), result.found, to_final),
            )
            for stage, y_pred, score_map, found, seconds in stages:
                iou_value, dice_value, auc_value = _score(y_pred, y, score_map, context)
                evaluation.rows.append(
                    EvaluationRow(
                        pair.name, pair.mask_names, prompt, method, stage,
                        iou_value, dice_value, auc_value, found, seconds,
                    )  # fmt: skip
                )
                if output_root is not None:
                    stage_name = "crf" if stage == STAGE_CRF else "sam"
                    path = output_root / _slug(method) / prompt_folders[prompt] / f"{stem}_{stage_name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_mask_png(path, np.asarray(y_pred, dtype=bool))
                    evaluation.saved_masks[(pair.name, method, prompt, stage)] = path
            outputs[prompt] = (result.saliency, result.coarse_mask, result.mask)
            done += 1
            if progress is not None:
                progress(done, total, f"{pair.name} | {method} | {prompt}")
        evaluation.sensitivity.extend(_prompt_sensitivity(pair.name, method, prompts, outputs))


def _prompt_sensitivity(
    image: str, method: str, prompts: Sequence[str], outputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> list[PromptSensitivityRow]:
    rows = []
    for prompt_a, prompt_b in combinations(prompts, 2):
        saliency_a, coarse_a, mask_a = outputs[prompt_a]
        saliency_b, coarse_b, mask_b = outputs[prompt_b]
        rows.append(
            PromptSensitivityRow(
                image=image,
                method=method,
                prompt_a=prompt_a,
                prompt_b=prompt_b,
                saliency_pearson=pearson_correlation(saliency_a, saliency_b),
                coarse_dice=dice(coarse_a, coarse_b),
                mask_dice=dice(mask_a, mask_b),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Statistics over images


@dataclass
class SummaryRow:
    """Statistics of one method / stage / prompt group over images.

    Attributes:
        method, stage, prompt: the group.
        n_images: number of per-image rows in the group.
        iou, dice, auc: `MedCLIPSAMLib.metrics.summarize` dicts (mean, std with ddof = 1, n, ci95_low,
            ci95_high), fractions in [0, 1]. The AUC's n leaves out images whose AUC is undefined.
        auc_undefined: images whose AUC is undefined (one-class ground truth) or was not measured.
    """

    method: str
    stage: str
    prompt: str
    n_images: int
    iou: dict
    dice: dict
    auc: dict
    auc_undefined: int

    def metric(self, name: str) -> dict:
        """Return the summary dict of metric `name` ("iou", "dice" or "auc")."""
        return getattr(self, name)


def _group_rows(rows: Iterable[EvaluationRow], fields: Sequence[str]) -> dict[tuple, list[EvaluationRow]]:
    """Group rows by the values of `fields`, keeping the order in which groups first appear."""
    groups: dict[tuple, list[EvaluationRow]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row, name) for name in fields), []).append(row)
    return groups


def summarize_rows(rows: Iterable[EvaluationRow]) -> list[SummaryRow]:
    """Summarise per-image rows per (method, stage, prompt), in order of first appearance."""
    summaries = []
    for (method, stage, prompt), group in _group_rows(rows, ("method", "stage", "prompt")).items():
        summaries.append(
            SummaryRow(
                method=method,
                stage=stage,
                prompt=prompt,
                n_images=len(group),
                iou=summarize(row.iou for row in group),
                dice=summarize(row.dice for row in group),
                auc=summarize(row.auc for row in group),
                auc_undefined=sum(1 for row in group if row.auc is None),
            )
        )
    return summaries


@dataclass
class ComparisonRow:
    """Paired two-sided t-test of one metric between two groups scored on the same images.

    Attributes:
        metric: "iou", "dice" or "auc".
        first, second: labels of the two groups (method / stage / prompt).
        result: `MedCLIPSAMLib.metrics.paired_ttest` dict (n, mean_difference = first - second, statistic,
            pvalue, df, note).
    """

    metric: str
    first: str
    second: str
    result: dict


def _paired_values(first: list[EvaluationRow], second: list[EvaluationRow], metric: str):
    """Align two groups' values by image name; images present in only one group are left out."""
    second_by_image = {row.image: row for row in second}
    a, b = [], []
    for row in first:
        other = second_by_image.get(row.image)
        if other is not None:
            a.append(row.metric(metric))
            b.append(other.metric(metric))
    return a, b


def _group_label(method: str, stage: str, prompt: str) -> str:
    return f"{method} / {stage}" + (f" / {prompt}" if prompt else "")


def compare_methods(rows: Sequence[EvaluationRow], first: str, second: str) -> list[ComparisonRow]:
    """Paired t-tests between two methods for every stage, prompt and metric, pairing rows by image name."""
    groups = _group_rows(rows, ("method", "stage", "prompt"))
    comparisons = []
    for (method, stage, prompt), group in groups.items():
        if method != first or (second, stage, prompt) not in groups:
            continue
        other = groups[(second, stage, prompt)]
        for metric in METRICS:
            a, b = _paired_values(group, other, metric)
            comparisons.append(
                ComparisonRow(
                    metric, _group_label(first, stage, prompt), _group_label(second, stage, prompt), paired_ttest(a, b)
                )
            )
    return comparisons


def compare_stages(
    rows: Sequence[EvaluationRow], first: str = STAGE_SAM, second: str = STAGE_CRF
) -> list[ComparisonRow]:
    """Paired t-tests between two stages for every method, prompt and metric, pairing rows by image name."""
    groups = _group_rows(rows, ("method", "stage", "prompt"))
    comparisons = []
    for (method, stage, prompt), group in groups.items():
        if stage != first or (method, second, prompt) not in groups:
            continue
        other = groups[(method, second, prompt)]
        for metric in METRICS:
            a, b = _paired_values(group, other, metric)
            comparisons.append(
                ComparisonRow(
                    metric, _group_label(method, first, prompt), _group_label(method, second, prompt), paired_ttest(a, b)
                )
            )
    return comparisons


def summarize_prompt_sensitivity(rows: Iterable[PromptSensitivityRow]) -> list[dict]:
    """Summarise prompt sensitivity per (method, prompt_a, prompt_b).

    Returns:
        One dict per group with keys method, prompt_a, prompt_b, n_images and saliency_pearson, coarse_dice,
        mask_dice (each a `MedCLIPSAMLib.metrics.summarize` dict).
    """
    groups: dict[tuple[str, str, str], list[PromptSensitivityRow]] = {}
    for row in rows:
        groups.setdefault((row.method, row.prompt_a, row.prompt_b), []).append(row)
    summaries = []
    for (method, prompt_a, prompt_b), group in groups.items():
        summaries.append(
            {
                "method": method,
                "prompt_a": prompt_a,
                "prompt_b": prompt_b,
                "n_images": len(group),
                "saliency_pearson": summarize(row.saliency_pearson for row in group),
                "coarse_dice": summarize(row.coarse_dice for row in group),
                "mask_dice": summarize(row.mask_dice for row in group),
            }
        )
    return summaries

"""Inference with a trained residual U-Net: 2D images, volumes slice by slice, and test-set scoring.

`WeakSegmenter` has the interface of `MedCLIPSAMLib.pipeline.ZeroShotSegmenter` (`segment`, `segment_volume`,
same result types), so the Slicer Logic and the CLI can swap the zero-shot pipeline for a network trained on its
pseudo-masks. The network ignores the prompt; results record it. The probability map fills the `saliency` field.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from MedCLIPSAMLib.errors import InvalidInputError, WeightsError
from MedCLIPSAMLib.pipeline import SegmentationResult, VolumeResult, extract_slice, insert_slice
from MedCLIPSAMLib.weak.data import NORMALIZATION, gray_from_rgb, resize_gray, standardize
from MedCLIPSAMLib.weak.train import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["WEAK_METHOD_NAME", "WeakSegmenter", "evaluate_weak"]

WEAK_METHOD_NAME = "weak supervision"
"""Method name of the network's rows in evaluation reports."""

_MIN_IMAGE_SIDE = 2  # to_rgb_uint8 needs H, W >= 2

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]


class WeakSegmenter:
    """Segment images and volumes with a residual U-Net checkpoint that `train_weak` wrote.

    Args:
        checkpoint: path of best.pt (or last.pt). Loaded on the CPU with ``weights_only=True``.
        device: torch device request ("auto": cuda > mps > cpu).
        threshold: probability above which a pixel is foreground; None uses the checkpoint's training
            threshold (0.5 by default).
        batch_size: slices per forward pass in `segment_volume`.

    Raises WeightsError when the checkpoint is missing, corrupt or of another format.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device = "auto",
        threshold: float | None = None,
        batch_size: int = 8,
    ) -> None:
        from MedCLIPSAMLib.models import resolve_device

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.checkpoint_path = Path(checkpoint)
        stored = load_checkpoint(self.checkpoint_path)
        preprocessing = stored["preprocessing"]
        if preprocessing.get("normalization") != NORMALIZATION:
            raise WeightsError(
                f"U-Net checkpoint {checkpoint} uses normalisation {preprocessing.get('normalization')!r}; this "
                f"MedCLIPSAMLib supports {NORMALIZATION!r}. Retrain with `medclipsam weak-train`."
            )
        self.image_size = int(preprocessing["image_size"])
        if threshold is None:
            threshold = float(preprocessing.get("threshold", 0.5))
        if not 0.0 < threshold < 1.0:
            raise InvalidInputError(f"threshold must be in (0, 1), got {threshold}.")
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.model = model_from_checkpoint(stored, self.checkpoint_path).to(self.device)
        self.epoch = int(stored.get("epoch", 0))
        self.best_val_dice = float(stored.get("best_val_dice", math.nan))

    # -- core -----------------------------------------------------------------------------------------------------

    def predict_probability(self, grays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the network on prepared grayscale images.

        Args:
            grays: float32 [H_i, W_i] images in [0, 1] (see `MedCLIPSAMLib.weak.data.prepare_gray`); sizes may
                differ.

        Returns:
            One float32 [H_i, W_i] foreground probability map in [0, 1] per image, at the image's own size.
        """
        size = (self.image_size, self.image_size)
        probabilities = []
        for start in range(0, len(grays), self.batch_size):
            chunk = grays[start : start + self.batch_size]
            batch = torch.stack([standardize(resize_gray(gray, size)) for gray in chunk])[:, None]
            with torch.no_grad():
                square = torch.sigmoid(self.model(batch.to(self.device))).float().cpu()
            for gray, probability in zip(chunk, square):
                original = resize_gray(probability[0], tuple(gray.shape))
                probabilities.append(original.clamp(0.0, 1.0).numpy().astype(np.float32))
        return probabilities

    # -- 2D -------------------------------------------------------------------------------------------------------

    def segment(self, image: np.ndarray, prompt: str = "", window: tuple[float, float] | None = None):
        """Segment one 2D image.

        Args:
            image: [H, W] or [H, W, C] array as `read_image` returns it (any real dtype; non-8-bit data windowed
                with `window`, else the 0.5-99.5 percentiles).
            prompt: recorded in the result; the network does not use it.

        Returns:
            SegmentationResult: mask bool [H, W]; saliency = probability float32 [H, W] in [0, 1];
            coarse_mask = mask; boxes int64 [N, 4] XYXY inclusive (one per 8-connected component, largest
            first); found; clip_score NaN (no CLIP model involved); timings prepare, network, boxes, total
            (seconds); rgb uint8 [H, W, 3].
        """
        from MedCLIPSAMLib.boxes import boxes_from_mask
        from MedCLIPSAMLib.imaging import to_rgb_uint8

        started = time.perf_counter()
        image = _checked_image(image)
        rgb = to_rgb_uint8(image, window=window)
        gray = gray_from_rgb(rgb)
        prepared = time.perf_counter()
        probability = self.predict_probability([gray])[0]
        mask = probability > self.threshold
        predicted = time.perf_counter()
        boxes = np.asarray(boxes_from_mask(mask), dtype=np.int64).reshape(-1, 4)
        finished = time.perf_counter()
        return SegmentationResult(
            prompt=str(prompt),
            mask=mask,
            saliency=probability,
            coarse_mask=mask.copy(),
            boxes=boxes,
            found=bool(mask.any()),
            clip_score=math.nan,
            timings={
                "prepare": prepared - started,
                "network": predicted - prepared,
                "boxes": finished - predicted,
                "total": finished - started,
            },
            rgb=rgb,
        )

    # -- 3D -------------------------------------------------------------------------------------------------------

    def segment_volume(
        self,
        volume: np.ndarray,
        prompt: str = "",
        axis: int = 0,
        slice_range: tuple[int, int] | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        window: tuple[float, float] | None = None,
    ) -> VolumeResult:
        """Segment a volume slice by slice along `axis`, `batch_size` slices per forward pass.

        Args:
            volume: 3D array of any real dtype, e.g. Slicer's (K, J, I) `arrayFromVolume` array.
            prompt: recorded in the result; the network does not use it.
            axis: axis to slice along (0, 1 or 2); each slice keeps the order of the two other axes.
            slice_range: half-open range [start, stop) of slice indices; None processes all slices.
            progress: called as progress(done, total, message) after each batch of slices.
            cancel: polled before each batch; True stops the run and returns what is done with cancelled=True.
            window: intensity window (low, high); None uses one 0.5-99.5 percentile window over the finite
                voxels of the whole volume. 8-bit volumes are used as they are unless a window is given.

        Returns:
            VolumeResult with mask (uint8 0/1) and saliency (probability, float32 in [0, 1]) of the volume's
            shape. Constant slices are listed in not_found_slices and left 0; skipped_slices stays empty.
        """
        from MedCLIPSAMLib.imaging import to_rgb_uint8
        from MedCLIPSAMLib.pipeline import checked_slice_range, volume_window

        started = time.perf_counter()
        volume = _checked_volume(volume, axis)
        start, stop = checked_slice_range(slice_range, volume.shape[axis])
        if window is None and volume.dtype != np.uint8:
            window = volume_window(volume)
        window_seconds = time.perf_counter() - started

        result = VolumeResult(
            prompt=str(prompt),
            mask=np.zeros(volume.shape, dtype=np.uint8),
            saliency=np.zeros(volume.shape, dtype=np.float32),
            found_slices=[],
            not_found_slices=[],
            skipped_slices=[],
            processed_slices=[],
            cancelled=False,
            timings={"prepare": 0.0, "network": 0.0},
            axis=int(axis),
        )
        indices = list(range(start, stop))
        for batch_start in range(0, len(indices), self.batch_size):
            if cancel is not None and cancel():
                logger.info("Volume segmentation cancelled after %d of %d slices.", batch_start, len(indices))
                result.cancelled = True
                break
            batch_indices = indices[batch_start : batch_start + self.batch_size]
            prepare_started = time.perf_counter()
            grays, with_contrast = [], []
            for index in batch_indices:
                image = np.ascontiguousarray(extract_slice(volume, axis, index))
                rgb = to_rgb_uint8(image, window=window) if window is not None or image.dtype == np.uint8 else None
                if rgb is None or rgb.min() == rgb.max():
                    result.not_found_slices.append(index)
                    continue
                grays.append(gray_from_rgb(rgb))
                with_contrast.append(index)
            network_started = time.perf_counter()
            for index, probability in zip(with_contrast, self.predict_probability(grays)):
                mask = probability > self.threshold
                insert_slice(result.mask, axis, index, mask.astype(np.uint8))
                insert_slice(result.saliency, axis, index, probability)
                (result.found_slices if mask.any() else result.not_found_slices).append(index)
            result.timings["prepare"] += network_started - prepare_started
            result.timings["network"] += time.perf_counter() - network_started
            result.processed_slices.extend(batch_indices)
            if progress is not None:
                done = batch_start + len(batch_indices)
                progress(done, len(indices), f"Slices {batch_indices[0]}-{batch_indices[-1]} done")

        result.found_slices.sort()
        result.not_found_slices.sort()
        result.timings["window"] = window_seconds
        result.timings["total"] = time.perf_counter() - started
        return result


def _checked_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(image).__name__}.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or min(image.shape[:2]) < _MIN_IMAGE_SIDE:
        raise InvalidInputError(
            f"image must be [H, W] or [H, W, C] with H, W >= {_MIN_IMAGE_SIDE}, got shape {image.shape}."
        )
    return image


def _checked_volume(volume: np.ndarray, axis: int) -> np.ndarray:
    if not isinstance(volume, np.ndarray) or volume.ndim != 3:
        raise InvalidInputError(f"volume must be a 3D numpy array, got shape {np.shape(volume)}.")
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise InvalidInputError(f"axis must be 0, 1 or 2, got {axis!r}.")
    if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == bool) or np.iscomplexobj(volume):
        raise InvalidInputError(f"volume must hold real numbers, got dtype {volume.dtype}.")
    slice_shape = [size for dimension, size in enumerate(volume.shape) if dimension != axis]
    if min(slice_shape) < _MIN_IMAGE_SIDE:
        raise InvalidInputError(
            f"slices along axis {axis} of volume {volume.shape} must be at least {_MIN_IMAGE_SIDE} pixels on each "
            "side; choose another axis."
        )
    return volume


# ------------------------------------------------------------------------------------------------- evaluation


def evaluate_weak(
    checkpoint: str | Path,
    images_dir: str | Path,
    masks_dir: str | Path,
    *,
    device: str | torch.device = "auto",
    threshold: float | None = None,
    progress: ProgressCallback | None = None,
):
    """Score a trained network on a labelled test split: IoU, Dice, and pixel AUC of the probability map.

    Pairs images with ground truth like every other method (`MedCLIPSAMLib.evaluate.pair_images_and_masks`, the
    union of an image's mask files) and scores with `MedCLIPSAMLib.metrics` (masks binarised as > 0,
    empty-vs-empty counts as 1, AUC None when the ground truth has one class only).

    Returns:
        (rows, summary). rows is a list of `evaluate.EvaluationRow`, one per image (method `WEAK_METHOD_NAME`,
        stage `evaluate.STAGE_MASK`, empty prompt), ready for `reports.write_rows_csv`. summary is the
        `evaluate.SummaryRow` of those rows (iou, dice, auc: mean, std, n, 95 % interval, fractions in [0, 1]),
        comparable with the weak-supervision results of MedCLIP-SAM (Koleilat et al., MICCAI 2024).

    Raises:
        InvalidInputError: a folder is missing, no image has a mask, or a mask's size differs from its image's.
        WeightsError: the checkpoint is missing or unreadable.
    """
    from MedCLIPSAMLib import evaluate, metrics
    from MedCLIPSAMLib.io import read_image

    segmenter = WeakSegmenter(checkpoint, device=device, threshold=threshold)
    pairs = evaluate.pair_images_and_masks(images_dir, masks_dir).pairs
    if not pairs:
        raise InvalidInputError(f"No image in {images_dir} has a ground-truth mask in {masks_dir}.")
    rows = []
    for done, pair in enumerate(pairs, start=1):
        started = time.perf_counter()
        image = read_image(pair.image)
        truth = evaluate.read_ground_truth(pair)
        if truth.shape != image.shape[:2]:
            raise InvalidInputError(
                f"Ground truth of {pair.name} has size {truth.shape} but the image has {image.shape[:2]}; a mask "
                "must have its image's height and width."
            )
        result = segmenter.segment(image, "")
        rows.append(
            evaluate.EvaluationRow(
                image=pair.name,
                mask=pair.mask_names,
                prompt="",
                method=WEAK_METHOD_NAME,
                stage=evaluate.STAGE_MASK,
                iou=metrics.iou(result.mask, truth),
                dice=metrics.dice(result.mask, truth),
                auc=metrics.pixel_auc(result.saliency, truth),
                found=result.found,
                seconds=time.perf_counter() - started,
            )
        )
        if progress is not None:
            progress(done, len(pairs), f"{pair.name}: Dice {rows[-1].dice:.4f}")
    return rows, evaluate.summarize_rows(rows)[0]

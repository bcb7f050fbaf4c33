"""Zero-shot text-prompt segmentation: BiomedCLIP saliency -> dense CRF -> boxes -> SAM, on 2D images and volumes.

Stages of `ZeroShotSegmenter.segment` (timings in seconds under the same names):

* prepare: image -> RGB uint8 (windowed unless 8-bit) -> letterboxed 224 x 224 CLIP tensor; prompt -> text embedding.
* saliency: gScoreCAM (default) or GradCAM map, mapped back onto the original pixels; CLIP score of the whole image.
* crf: dense CRF on the saliency map -> coarse mask.
* boxes: one XYXY box per connected component of the coarse mask.
* sam: SAM image embedding plus one batched box-prompt call; the mask is the union of the box masks.

An empty coarse mask means "target not found": the result has an empty mask and SAM is not run, because no box is
ever invented.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from MedCLIPSAMLib import boxes as _boxes
from MedCLIPSAMLib import crf as _crf
from MedCLIPSAMLib import imaging as _imaging
from MedCLIPSAMLib import saliency as _saliency
from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.models import native_bfloat16
from MedCLIPSAMLib.sam import SamBoxSegmenter

__all__ = [
    "MIN_IMAGE_SIDE",
    "SALIENCY_METHODS",
    "PRECISIONS",
    "SegmentationResult",
    "VolumeResult",
    "ZeroShotConfig",
    "ZeroShotSegmenter",
    "checked_slice_range",
    "extract_slice",
    "insert_slice",
    "volume_window",
]

logger = logging.getLogger(__name__)

SALIENCY_METHODS = ("gscorecam", "gradcam")

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
"""Values of `ZeroShotConfig.precision`; "auto" is bfloat16 where the hardware computes it natively (see
`ZeroShotConfig`)."""

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MIN_IMAGE_SIDE = 16
"""Smallest accepted image height and width in pixels: one ViT-B/16 patch. A smaller image would fill less than one
CLIP token after letterboxing, so its saliency map carries no spatial information."""

STAGES = ("prepare", "saliency", "crf", "boxes", "sam")

# Upper bound on the voxels used to compute a volume's window. Larger volumes are subsampled with a regular stride,
# which keeps the percentile estimate close while the copy stays small (about 128 MB as float64).
_MAX_WINDOW_SAMPLES = 1 << 24

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]


# --------------------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass
class ZeroShotConfig:
    """Parameters of the zero-shot pipeline. Defaults are the MedCLIP-SAM paper's settings (arXiv 2403.20253).

    Attributes:
        saliency: Saliency method, "gscorecam" (the method) or "gradcam" (ablation baseline).
        top_k: Number of gScoreCAM channels kept by gradient importance; the paper uses 60.
        batch_size: Masked CLIP forwards per batch in gScoreCAM (speed only; see `saliency.DEFAULT_BATCH_SIZE`).
        crf_tau: Temperature of the CRF unary energies (> 0).
        crf_gaussian_sxy: Spatial standard deviation of the CRF smoothness kernel, pixels.
        crf_gaussian_compat: Weight of the smoothness kernel.
        crf_bilateral_sxy: Spatial standard deviation of the CRF appearance kernel, pixels.
        crf_bilateral_srgb: Colour standard deviation of the appearance kernel, 8-bit intensity units.
        crf_bilateral_compat: Weight of the appearance kernel.
        crf_iterations: Mean-field iterations.
        min_box_area: Coarse-mask components smaller than this many pixels get no box.
        max_boxes: Keep at most this many boxes, largest components first; None keeps all.
        box_margin: Pixels added on every side of each box (clipped to the image).
        window: Intensity window (low, high) for images that are not 8-bit; None uses the 0.5-99.5 percentile range
            (of the image in 2D, of the whole volume in `segment_volume`).
        presence_threshold: Volumes only. A slice whose CLIP score (logit_scale x cosine similarity of the whole
            slice and the prompt) is below this value is skipped: no saliency, CRF or SAM, an all-zero mask and
            saliency, and the slice is listed in `VolumeResult.skipped_slices`. None segments every slice.
        precision: Compute type of the CLIP image tower and the SAM image encoder, which do almost all of the
            arithmetic. "float32" is exact. "bfloat16" and "float16" use `torch.autocast`: matrix products in that
            type, weights and normalisations in float32. "auto" (the default) is bfloat16 for a float32 CLIP model
            on a device with native bfloat16 arithmetic (`MedCLIPSAMLib.models.native_bfloat16`: CPUs with
            AVX512_BF16 or AMX, CUDA GPUs from Ampere on) and float32 elsewhere. A CLIP model converted to
            bfloat16 or float16 always computes in its own type, and "auto" then selects that type. bfloat16 is
            about twice as fast on such hardware, and its effect on saliency and masks is measured in
            docs/benchmarks.md. Choose "float32" for results that do not depend on the hardware.
    """

    saliency: str = "gscorecam"
    top_k: int = 60
    batch_size: int = _saliency.DEFAULT_BATCH_SIZE
    crf_tau: float = 1.05
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 60.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 5.0
    crf_iterations: int = 1
    min_box_area: int = 0
    max_boxes: int | None = None
    box_margin: int = 0
    window: tuple[float, float] | None = None
    presence_threshold: float | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidInputError naming the first invalid parameter, its value and the valid range."""
        if self.saliency not in SALIENCY_METHODS:
            raise InvalidInputError(f"saliency must be one of {', '.join(SALIENCY_METHODS)}, got {self.saliency!r}.")
        _check_int("top_k", self.top_k, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_float("crf_tau", self.crf_tau, positive=True)
        _check_float("crf_gaussian_sxy", self.crf_gaussian_sxy, positive=True)
        _check_float("crf_gaussian_compat", self.crf_gaussian_compat, positive=True)
        _check_float("crf_bilateral_sxy", self.crf_bilateral_sxy, positive=True)
        _check_float("crf_bilateral_srgb", self.crf_bilateral_srgb, positive=True)
        _check_float("crf_bilateral_compat", self.crf_bilateral_compat, positive=True)
        _check_int("crf_iterations", self.crf_iterations, minimum=1)
        _check_int("min_box_area", self.min_box_area, minimum=0)
        if self.max_boxes is not None:
            _check_int("max_boxes", self.max_boxes, minimum=1)
        _check_int("box_margin", self.box_margin, minimum=0)
        if self.window is not None:
            self.window = _checked_window(self.window)
        if self.presence_threshold is not None:
            _check_float("presence_threshold", self.presence_threshold, positive=False, allow_negative=True)
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")

    def crf_kwargs(self) -> dict:
        """Keyword arguments of `MedCLIPSAMLib.crf.crf_refine` taken from this configuration."""
        return {
            "tau": float(self.crf_tau),
            "gaussian_sxy": self.crf_gaussian_sxy,
            "gaussian_compat": self.crf_gaussian_compat,
            "bilateral_sxy": self.crf_bilateral_sxy,
            "bilateral_srgb": self.crf_bilateral_srgb,
            "bilateral_compat": self.crf_bilateral_compat,
            "iterations": int(self.crf_iterations),
        }

    def to_dict(self) -> dict:
        """Parameters as a JSON-serialisable dict (window as a list or None)."""
        values = dataclasses.asdict(self)
        if self.window is not None:
            values["window"] = [float(self.window[0]), float(self.window[1])]
        return values


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_float(name: str, value, positive: bool, allow_negative: bool = False) -> None:
    valid = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    valid = valid and math.isfinite(float(value))
    if valid and not allow_negative:
        valid = float(value) > 0 if positive else float(value) >= 0
    if not valid:
        if allow_negative:
            expected = "a finite number"
        elif positive:
            expected = "a finite number > 0"
        else:
            expected = "a finite number >= 0"
        raise InvalidInputError(f"{name} must be {expected}, got {value!r}.")


def _checked_window(window) -> tuple[float, float]:
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError):
        raise InvalidInputError(f"window must be a pair (low, high) of numbers, got {window!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InvalidInputError(f"window must be finite with low < high, got ({low}, {high}).")
    return (low, high)


@dataclass
class SegmentationResult:
    """Result of one 2D segmentation; all maps are at the original image size (H, W).

    Attributes:
        prompt: The text prompt.
        mask: [H, W] bool, final mask (union of the SAM box masks); all False when the target was not found.
        saliency: [H, W] float32 in [0, 1], saliency map on the original pixels.
        coarse_mask: [H, W] bool, CRF output.
        boxes: [N, 4] int64 XYXY pixel coordinates, inclusive maxima, largest component first; N may be 0.
        found: True when the final mask has at least one pixel.
        clip_score: CLIP logit of the whole image and the prompt (logit_scale x cosine similarity).
        timings: Seconds per stage: prepare, saliency, crf, boxes, sam, and total.
        rgb: [H, W, 3] uint8, the prepared image that CLIP, the CRF and SAM saw (used to draw overlays).
    """

    prompt: str
    mask: np.ndarray
    saliency: np.ndarray
    coarse_mask: np.ndarray
    boxes: np.ndarray
    found: bool
    clip_score: float
    timings: dict[str, float]
    rgb: np.ndarray | None = None


@dataclass
class VolumeResult:
    """Result of slice-by-slice segmentation of a volume; arrays have the input volume's shape and axis order.

    Every processed slice is in exactly one of found_slices, not_found_slices and skipped_slices.

    Attributes:
        prompt: The text prompt.
        mask: uint8 0/1, same shape as the volume; slices not processed are 0.
        saliency: float32 in [0, 1], same shape as the volume; slices not processed or skipped are 0.
        found_slices: Indices along `axis` whose final mask is not empty.
        not_found_slices: Indices processed without a mask: empty coarse mask, or a constant slice (no contrast).
        skipped_slices: Indices whose CLIP score was below `ZeroShotConfig.presence_threshold`.
        processed_slices: Indices visited, in order; shorter than the requested range after a cancel.
        cancelled: True when the cancel callback stopped the run before every requested slice was processed.
        timings: Seconds per stage summed over slices, plus "window" and "total".
        axis: Axis of the volume along which it was sliced.
        clip_scores: CLIP score per slice index, for every processed slice that has contrast.
    """

    prompt: str
    mask: np.ndarray
    saliency: np.ndarray
    found_slices: list[int]
    not_found_slices: list[int]
    skipped_slices: list[int]
    processed_slices: list[int]
    cancelled: bool
    timings: dict[str, float]
    axis: int = 0
    clip_scores: dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Slices of a volume


def extract_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Return slice `index` of a 3D array along `axis` as a 2D view; the two other axes keep their order.

    For Slicer's (K, J, I) arrays, axis 0 gives [J, I] slices, axis 1 [K, I] and axis 2 [K, J].
    """
    _check_volume_axis(volume, axis)
    if not 0 <= index < volume.shape[axis]:
        raise InvalidInputError(f"slice index {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}.")
    selector = [slice(None)] * 3
    selector[axis] = index
    return volume[tuple(selector)]


def insert_slice(volume: np.ndarray, axis: int, index: int, values: np.ndarray) -> None:
    """Write a 2D array into slice `index` of a 3D array along `axis`, in place; the inverse of `extract_slice`."""
    _check_volume_axis(volume, axis)
    expected = tuple(size for dimension, size in enumerate(volume.shape) if dimension != axis)
    if tuple(np.shape(values)) != expected:
        raise InvalidInputError(f"slice shape {np.shape(values)} does not fit axis {axis} of volume {volume.shape}.")
    if not 0 <= index < volume.shape[axis]:
        raise InvalidInputError(f"slice index {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}.")
    selector = [slice(None)] * 3
    selector[axis] = index
    volume[tuple(selector)] = values


def _check_volume_axis(volume: np.ndarray, axis: int) -> None:
    if not isinstance(volume, np.ndarray) or volume.ndim != 3:
        raise InvalidInputError(f"volume must be a 3D numpy array, got shape {np.shape(volume)}.")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (0, 1, 2):
        raise InvalidInputError(f"axis must be 0, 1 or 2, got {axis!r}.")


def checked_slice_range(slice_range: tuple[int, int] | None, count: int) -> tuple[int, int]:
    """Validate a half-open slice range ``(start, stop)`` against `count` slices; None means all slices.

    Raises:
        InvalidInputError: for a range that is not a pair of integers with ``0 <= start < stop <= count``.
    """
    if slice_range is None:
        return 0, count
    try:
        start, stop = (int(value) for value in slice_range)
    except (TypeError, ValueError):
        raise InvalidInputError(f"slice_range must be a pair (start, stop), got {slice_range!r}.") from None
    if not 0 <= start < stop <= count:
        raise InvalidInputError(
            f"slice_range ({start}, {stop}) must satisfy 0 <= start < stop <= {count} (half-open range)."
        )
    return start, stop


def volume_window(volume: np.ndarray) -> tuple[float, float] | None:
    """Return the 0.5-99.5 percentile window over the finite voxels, or None when the volume has no contrast."""
    flat = volume.reshape(-1)
    if flat.size > _MAX_WINDOW_SAMPLES:
        flat = flat[:: math.ceil(flat.size / _MAX_WINDOW_SAMPLES)]
    finite = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if finite.size == 0 or finite.min() == finite.max():
        return None
    try:
        return _imaging.compute_window(finite)
    except InvalidInputError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Segmenter


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"The text prompt must be a non-empty string, got {prompt!r}.")
    return prompt.strip()


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(image).__name__}.")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise InvalidInputError(
            f"image must be 2D gray (H, W) or (H, W, C) with C in 1 to 4 (gray, gray + alpha, RGB, RGBA), got shape "
            f"{image.shape}."
        )
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise InvalidInputError(
            f"image of {image.shape[1]} x {image.shape[0]} pixels is too small: width and height must be at least "
            f"{MIN_IMAGE_SIDE} pixels."
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
        raise InvalidInputError(f"image must hold real numbers, got dtype {image.dtype}.")


class _StageTimer:
    """Accumulate wall-clock seconds per stage name."""

    def __init__(self) -> None:
        self.seconds = {stage: 0.0 for stage in STAGES}
        self._start = time.perf_counter()
        self._stage_start = self._start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - self._stage_start)
        self._stage_start = now

    def skip(self) -> None:
        self._stage_start = time.perf_counter()

    def result(self) -> dict[str, float]:
        seconds = dict(self.seconds)
        seconds["total"] = time.perf_counter() - self._start
        return seconds


class ZeroShotSegmenter:
    """Zero-shot text-prompt segmenter: BiomedCLIP gScoreCAM saliency, dense CRF, boxes and SAM.

    One instance keeps the models and the SAM image embedding of the last image, so segmenting the same image with
    several prompts computes that embedding once.
    """

    def __init__(self, clip, sam_model, config: ZeroShotConfig | None = None) -> None:
        """
        Args:
            clip: `MedCLIPSAMLib.models.ClipBundle` (model in eval mode, tokenizer, normalisation, device, dtype).
            sam_model: `segment_anything.modeling.Sam` in eval mode.
            config: Pipeline parameters; None uses the defaults of `ZeroShotConfig`.
        """
        if config is None:
            config = ZeroShotConfig()
        if not isinstance(config, ZeroShotConfig):
            raise InvalidInputError(f"config must be a ZeroShotConfig, got {type(config).__name__}.")
        config.validate()
        self.clip = clip
        self.config = config
        self.compute_dtype = self._resolve_precision()
        self.sam = SamBoxSegmenter(sam_model, encoder_dtype=self.compute_dtype)

    def _resolve_precision(self) -> torch.dtype:
        """Return the compute type selected by `config.precision` (for "auto" see `ZeroShotConfig.precision`)."""
        if self.config.precision != "auto":
            return _TORCH_DTYPES[self.config.precision]
        clip_dtype = getattr(self.clip, "dtype", torch.float32)
        if clip_dtype != torch.float32:
            return clip_dtype if clip_dtype in _TORCH_DTYPES.values() else torch.float32
        device = getattr(self.clip, "device", "cpu")
        if native_bfloat16(device):
            logger.info("Computing in bfloat16: device %s has native bfloat16 arithmetic (precision='float32' "
                        "turns this off).", device)
            return torch.bfloat16
        return torch.float32

    def _precision_kwargs(self) -> dict:
        """Keyword arguments that make the saliency functions autocast a float32 CLIP model; empty otherwise."""
        if self.compute_dtype == torch.float32 or self.clip.dtype != torch.float32:
            return {}
        return {"compute_dtype": self.compute_dtype}

    # -- 2D ----------------------------------------------------------------------------------------------------------

    def segment(self, image: np.ndarray, prompt: str) -> SegmentationResult:
        """Segment the structure named by `prompt` in one 2D image.

        Args:
            image: As `MedCLIPSAMLib.io.read_image` returns it: [H, W] gray or [H, W, C] with C in 1 to 4, any real
                dtype. 8-bit images are used as they are; others are windowed with `config.window`, else with the
                0.5-99.5 percentile range of their finite values. H and W must be at least `MIN_IMAGE_SIDE`.
            prompt: Text naming the target, e.g. "breast tumor".

        Returns:
            SegmentationResult with maps at (H, W). found is False, with an empty mask and no SAM call, when the
            coarse mask is empty.

        Raises:
            InvalidInputError: Empty prompt, unusable image (wrong shape, too small, constant, no finite values).
        """
        prompt = _check_prompt(prompt)
        _check_image(image)
        timer = _StageTimer()
        rgb = _imaging.to_rgb_uint8(image, window=self.config.window)
        if rgb.min() == rgb.max():
            raise InvalidInputError(
                f"The image has no contrast (every pixel is {int(rgb.flat[0])} after conversion to 8 bits), so there "
                "is nothing to segment; check the file or the window."
            )
        text_embedding = _saliency.encode_prompt(self.clip, prompt)
        timer.lap("prepare")
        return self._segment_rgb(rgb, prompt, text_embedding, timer)

    def _clip_tensor(self, rgb: np.ndarray):
        tensor, letterbox = _imaging.clip_input(rgb, self.clip.mean, self.clip.std, size=self.clip.image_size)
        return tensor.to(device=self.clip.device, dtype=self.clip.dtype), letterbox

    def _saliency_224(self, tensor: torch.Tensor, text_embedding: torch.Tensor) -> np.ndarray:
        if self.config.saliency == "gradcam":
            return _saliency.gradcam(self.clip, tensor, text_embedding, **self._precision_kwargs())
        return _saliency.gscorecam(
            self.clip,
            tensor,
            text_embedding,
            top_k=self.config.top_k,
            batch_size=self.config.batch_size,
            **self._precision_kwargs(),
        )

    def _segment_rgb(
        self,
        rgb: np.ndarray,
        prompt: str,
        text_embedding: torch.Tensor,
        timer: _StageTimer,
        tensor_and_letterbox=None,
        score: float | None = None,
    ) -> SegmentationResult:
        """Run saliency, CRF, boxes and SAM on a prepared [H, W, 3] uint8 image."""
        height, width = rgb.shape[:2]
        if tensor_and_letterbox is None:
            tensor_and_letterbox = self._clip_tensor(rgb)
            timer.lap("prepare")
        tensor, letterbox = tensor_and_letterbox

        saliency_square = self._saliency_224(tensor, text_embedding)
        saliency = np.clip(np.asarray(letterbox.map_to_original(saliency_square), dtype=np.float32), 0.0, 1.0)
        if score is None:
            score = float(_saliency.clip_score(self.clip, tensor, text_embedding, **self._precision_kwargs()))
        timer.lap("saliency")

        coarse_mask = np.asarray(_crf.crf_refine(rgb, saliency, **self.config.crf_kwargs()), dtype=bool)
        timer.lap("crf")

        boxes = np.asarray(
            _boxes.boxes_from_mask(
                coarse_mask,
                min_area=self.config.min_box_area,
                max_boxes=self.config.max_boxes,
                margin=self.config.box_margin,
            ),
            dtype=np.int64,
        ).reshape(-1, 4)
        timer.lap("boxes")

        if len(boxes) == 0:
            logger.info("Target not found for prompt %r: the coarse mask is empty, so SAM is not run.", prompt)
            mask = np.zeros((height, width), dtype=bool)
            timer.skip()
        else:
            self.sam.set_image(rgb)
            mask = self.sam.segment_boxes(boxes)
            timer.lap("sam")
            if not mask.any():
                logger.info("Target not found for prompt %r: SAM returned empty masks for %d boxes.", prompt, len(boxes))

        return SegmentationResult(
            prompt=prompt,
            mask=mask,
            saliency=saliency,
            coarse_mask=coarse_mask,
            boxes=boxes,
            found=bool(mask.any()),
            clip_score=score,
            timings=timer.result(),
            rgb=rgb,
        )

    # -- 3D ----------------------------------------------------------------------------------------------------------

    def segment_volume(
        self,
        volume: np.ndarray,
        prompt: str,
        axis: int = 0,
        slice_range: tuple[int, int] | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        window: tuple[float, float] | None = None,
    ) -> VolumeResult:
        """Segment a volume slice by slice along `axis`.

        Args:
            volume: 3D array, any real dtype, e.g. Slicer's (K, J, I) `arrayFromVolume` array.
            prompt: Text naming the target.
            axis: Axis to slice along (0, 1 or 2); each slice keeps the order of the two other axes.
            slice_range: Half-open range [start, stop) of slice indices along `axis`; None processes all slices.
            progress: Called as progress(done, total, message) after each slice.
            cancel: Polled before each slice; when it returns True the run stops and returns what is done with
                cancelled=True. The caller decides whether to keep the partial result.
            window: Intensity window (low, high). None uses `config.window`, else one 0.5-99.5 percentile window over
                the finite voxels of the whole volume, so every slice is windowed alike. 8-bit volumes are used as
                they are unless a window is given.

        Returns:
            VolumeResult with mask and saliency of the volume's shape. Constant slices (no contrast) are listed in
            not_found_slices. With `config.presence_threshold` set, slices whose CLIP score is below it are listed in
            skipped_slices and left 0.

        Raises:
            InvalidInputError: Not a 3D array, bad axis or range, slices smaller than `MIN_IMAGE_SIDE`, empty prompt.
        """
        prompt = _check_prompt(prompt)
        _check_volume_axis(volume, axis)
        if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == bool) or np.iscomplexobj(volume):
            raise InvalidInputError(f"volume must hold real numbers, got dtype {volume.dtype}.")
        slice_shape = tuple(size for dimension, size in enumerate(volume.shape) if dimension != axis)
        if min(slice_shape) < MIN_IMAGE_SIDE:
            raise InvalidInputError(
                f"slices along axis {axis} of volume {volume.shape} are {slice_shape}: both sides must be at least "
                f"{MIN_IMAGE_SIDE} pixels; choose another axis."
            )
        start, stop = checked_slice_range(slice_range, volume.shape[axis])
        total_timer = time.perf_counter()

        if window is not None:
            window = _checked_window(window)
        elif self.config.window is not None:
            window = self.config.window
        elif volume.dtype != np.uint8:
            window = volume_window(volume)
        window_seconds = time.perf_counter() - total_timer

        text_embedding = _saliency.encode_prompt(self.clip, prompt)
        result = VolumeResult(
            prompt=prompt,
            mask=np.zeros(volume.shape, dtype=np.uint8),
            saliency=np.zeros(volume.shape, dtype=np.float32),
            found_slices=[],
            not_found_slices=[],
            skipped_slices=[],
            processed_slices=[],
            cancelled=False,
            timings={stage: 0.0 for stage in STAGES},
            axis=int(axis),
        )
        total = stop - start
        for done, index in enumerate(range(start, stop)):
            if cancel is not None and cancel():
                logger.info("Volume segmentation cancelled after %d of %d slices.", done, total)
                result.cancelled = True
                break
            status = self._segment_volume_slice(result, volume, axis, index, prompt, text_embedding, window)
            result.processed_slices.append(index)
            if progress is not None:
                progress(done + 1, total, f"Slice {index}: {status}")

        result.timings["window"] = window_seconds
        result.timings["total"] = time.perf_counter() - total_timer
        return result

    def _segment_volume_slice(
        self,
        result: VolumeResult,
        volume: np.ndarray,
        axis: int,
        index: int,
        prompt: str,
        text_embedding: torch.Tensor,
        window: tuple[float, float] | None,
    ) -> str:
        """Segment one slice into `result` and return a short status word for the progress message."""
        timer = _StageTimer()
        image = extract_slice(volume, axis, index)
        rgb = None
        if window is not None or volume.dtype == np.uint8:
            rgb = _imaging.to_rgb_uint8(np.ascontiguousarray(image), window=window)
        if rgb is None or rgb.min() == rgb.max():
            # No contrast, e.g. air outside the body: nothing to segment, which is not an error.
            result.not_found_slices.append(index)
            self._add_timings(result, timer.result())
            return "no contrast"

        tensor, letterbox = self._clip_tensor(rgb)
        score = float(_saliency.clip_score(self.clip, tensor, text_embedding, **self._precision_kwargs()))
        result.clip_scores[index] = score
        timer.lap("prepare")
        threshold = self.config.presence_threshold
        if threshold is not None and score < threshold:
            result.skipped_slices.append(index)
            self._add_timings(result, timer.result())
            return f"skipped (CLIP score {score:.3g} < {threshold:.3g})"

        slice_result = self._segment_rgb(rgb, prompt, text_embedding, timer, (tensor, letterbox), score)
        insert_slice(result.mask, axis, index, slice_result.mask.astype(np.uint8))
        insert_slice(result.saliency, axis, index, slice_result.saliency)
        self._add_timings(result, slice_result.timings)
        if slice_result.found:
            result.found_slices.append(index)
            return "found"
        result.not_found_slices.append(index)
        return "not found"

    @staticmethod
    def _add_timings(result: VolumeResult, timings: dict[str, float]) -> None:
        for stage in STAGES:
            result.timings[stage] += timings.get(stage, 0.0)

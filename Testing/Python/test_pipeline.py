"""Tests of ZeroShotSegmenter (2D and slice by slice) with the tiny BiomedCLIP and SAM models on real images."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedCLIPSAMLib import saliency
from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.models import load_clip, load_sam
from MedCLIPSAMLib.pipeline import (
    SegmentationResult,
    VolumeResult,
    ZeroShotConfig,
    ZeroShotSegmenter,
    extract_slice,
    insert_slice,
)

PROMPT = "breast tumor"
FAST = {"top_k": 8}


@pytest.fixture(scope="module")
def clip_bundle(tiny_clip_id):
    return load_clip(tiny_clip_id, device="cpu")


@pytest.fixture(scope="module")
def sam_model(tiny_sam_checkpoint):
    return load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ultrasound(shared_data) -> np.ndarray:
    """Real breast ultrasound image, 8-bit RGB, not square."""
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        return np.array(image)


@pytest.fixture(scope="module")
def mr_volume(shared_data) -> np.ndarray:
    """Real MR volume (int16, K x J x I = 25 x 256 x 256) reduced to 25 x 64 x 64 to keep the tests fast."""
    image = sitk.ReadImage(str(shared_data / "volumes" / "pyradiomics_brain1" / "brain1_image.nrrd"))
    return np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, ::4, ::4])


def _segmenter(clip_bundle, sam_model, **config) -> ZeroShotSegmenter:
    return ZeroShotSegmenter(clip_bundle, sam_model, ZeroShotConfig(**{**FAST, **config}))


@pytest.fixture(scope="module")
def ultrasound_run(clip_bundle, sam_model, ultrasound) -> tuple[ZeroShotSegmenter, SegmentationResult]:
    """One segmentation of the ultrasound image, shared by the tests that only inspect its result."""
    segmenter = _segmenter(clip_bundle, sam_model)
    return segmenter, segmenter.segment(ultrasound, PROMPT)


def _zero_saliency(clip, image_tensor, text_embedding, top_k=60, batch_size=16, **_):
    size = image_tensor.shape[-1]
    return np.zeros((size, size), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_config_defaults_follow_paper():
    config = ZeroShotConfig()
    assert config.top_k == 60
    assert config.crf_tau == 1.05
    assert config.crf_gaussian_sxy == 3
    assert config.crf_bilateral_sxy == 60
    assert config.crf_bilateral_srgb == 5
    assert config.crf_bilateral_compat == 5
    assert config.crf_iterations == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("saliency", "scorecam"),
        ("top_k", 0),
        ("top_k", 2.5),
        ("batch_size", 0),
        ("crf_tau", 0.0),
        ("crf_tau", float("nan")),
        ("crf_gaussian_sxy", -1.0),
        ("crf_gaussian_compat", 0.0),
        ("crf_bilateral_srgb", 0.0),
        ("crf_iterations", 0),
        ("min_box_area", -1),
        ("max_boxes", 0),
        ("box_margin", -2),
        ("window", (100.0, 10.0)),
        ("window", (0.0, float("inf"))),
        ("presence_threshold", float("nan")),
    ],
)
def test_config_rejects_invalid_value(name, value):
    with pytest.raises(InvalidInputError, match=name):
        ZeroShotConfig(**{name: value})


def test_config_to_dict_is_plain():
    values = ZeroShotConfig(window=(0, 255)).to_dict()
    assert values["window"] == [0.0, 255.0]
    assert values["saliency"] == "gscorecam"


# ---------------------------------------------------------------------------------------------------------------------
# 2D


def test_segment_non_square_image(ultrasound_run, ultrasound):
    _, result = ultrasound_run
    height, width = ultrasound.shape[:2]

    assert isinstance(result, SegmentationResult)
    assert height != width
    assert result.mask.shape == (height, width)
    assert result.mask.dtype == bool
    assert result.saliency.shape == (height, width)
    assert result.saliency.dtype == np.float32
    assert result.saliency.min() >= 0.0
    assert result.saliency.max() <= 1.0
    assert result.coarse_mask.shape == (height, width)
    assert result.boxes.dtype == np.int64
    assert result.boxes.shape[1] == 4
    assert set(result.timings) >= {"prepare", "saliency", "crf", "boxes", "sam"}
    assert np.isfinite(result.clip_score)


def test_boxes_lie_inside_image(ultrasound_run, ultrasound):
    _, result = ultrasound_run
    height, width = ultrasound.shape[:2]

    assert len(result.boxes) > 0
    assert result.boxes[:, [0, 1]].min() >= 0
    assert result.boxes[:, 2].max() <= width - 1
    assert result.boxes[:, 3].max() <= height - 1


def test_found_runs_sam_once(ultrasound_run):
    segmenter, result = ultrasound_run

    assert result.found == bool(result.mask.any())
    assert segmenter.sam.call_count == 1
    assert segmenter.sam.embedding_count == 1


def test_second_prompt_reuses_sam_embedding(clip_bundle, sam_model, ultrasound):
    segmenter = _segmenter(clip_bundle, sam_model)
    segmenter.segment(ultrasound, PROMPT)
    segmenter.segment(ultrasound, "benign lesion")

    assert segmenter.sam.embedding_count == 1


def test_segment_repeatable(clip_bundle, sam_model, ultrasound, ultrasound_run):
    _, first = ultrasound_run
    second = _segmenter(clip_bundle, sam_model).segment(ultrasound, PROMPT)

    assert np.array_equal(first.saliency, second.saliency)
    assert np.array_equal(first.mask, second.mask)


def test_gradcam_method_runs(clip_bundle, sam_model, ultrasound):
    result = _segmenter(clip_bundle, sam_model, saliency="gradcam").segment(ultrasound, PROMPT)
    assert result.saliency.shape == ultrasound.shape[:2]


def test_empty_saliency_not_found_without_sam(clip_bundle, sam_model, ultrasound, monkeypatch):
    monkeypatch.setattr(saliency, "gscorecam", _zero_saliency)
    segmenter = _segmenter(clip_bundle, sam_model)
    result = segmenter.segment(ultrasound, PROMPT)

    assert result.found is False
    assert not result.coarse_mask.any()
    assert not result.mask.any()
    assert result.mask.shape == ultrasound.shape[:2]
    assert result.boxes.shape == (0, 4)
    assert segmenter.sam.call_count == 0
    assert segmenter.sam.embedding_count == 0


def test_target_not_found_logged(clip_bundle, sam_model, ultrasound, monkeypatch, caplog):
    monkeypatch.setattr(saliency, "gscorecam", _zero_saliency)
    with caplog.at_level("INFO", logger="MedCLIPSAMLib.pipeline"):
        _segmenter(clip_bundle, sam_model).segment(ultrasound, PROMPT)
    assert "Target not found" in caplog.text


def test_sixteen_bit_image_with_window(clip_bundle, sam_model, ultrasound, ultrasound_run):
    gray16 = ultrasound[:, :, 0].astype(np.uint16) * 257
    result = _segmenter(clip_bundle, sam_model, window=(0, 65535)).segment(gray16, PROMPT)
    _, reference = ultrasound_run

    # Window 0..65535 maps v * 257 back to v, so the prepared image and every map are those of the 8-bit input.
    assert np.array_equal(result.rgb, reference.rgb)
    assert np.array_equal(result.mask, reference.mask)


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt_raises(clip_bundle, sam_model, ultrasound, prompt):
    with pytest.raises(InvalidInputError, match="prompt"):
        _segmenter(clip_bundle, sam_model).segment(ultrasound, prompt)


@pytest.mark.parametrize(
    "image",
    [np.zeros((1, 1), np.uint8), np.full((40, 50), 7, np.uint8), np.full((40, 50), np.nan, np.float32)],
    ids=["one-pixel", "constant", "all-nan"],
)
def test_unusable_image_raises(clip_bundle, sam_model, image):
    with pytest.raises(InvalidInputError):
        _segmenter(clip_bundle, sam_model).segment(image, PROMPT)


# ---------------------------------------------------------------------------------------------------------------------
# Slices


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_round_trip(axis):
    volume = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5)
    rebuilt = np.zeros_like(volume)
    for index in range(volume.shape[axis]):
        insert_slice(rebuilt, axis, index, extract_slice(volume, axis, index))
    assert np.array_equal(rebuilt, volume)


def test_slice_keeps_axis_order():
    volume = np.zeros((3, 4, 5))
    assert extract_slice(volume, 0, 1).shape == (4, 5)
    assert extract_slice(volume, 1, 1).shape == (3, 5)
    assert extract_slice(volume, 2, 1).shape == (3, 4)


@pytest.mark.parametrize(("axis", "index"), [(3, 0), (0, 3), (-1, 0)])
def test_slice_rejects_bad_axis_or_index(axis, index):
    with pytest.raises(InvalidInputError):
        extract_slice(np.zeros((3, 4, 5)), axis, index)


# ---------------------------------------------------------------------------------------------------------------------
# Volumes


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_shapes_per_axis(clip_bundle, sam_model, mr_volume, axis):
    middle = mr_volume.shape[axis] // 2
    result = _segmenter(clip_bundle, sam_model).segment_volume(
        mr_volume, "brain tumor", axis=axis, slice_range=(middle, middle + 2)
    )

    assert isinstance(result, VolumeResult)
    assert result.mask.shape == mr_volume.shape
    assert result.mask.dtype == np.uint8
    assert result.saliency.shape == mr_volume.shape
    assert result.saliency.dtype == np.float32
    assert result.processed_slices == [middle, middle + 1]
    outside = np.delete(result.saliency, [middle, middle + 1], axis=axis)
    assert not outside.any()


def test_volume_slice_matches_2d(clip_bundle, sam_model, mr_volume):
    """A volume slice gives the 2D result of that slice windowed with the volume's window."""
    from MedCLIPSAMLib.imaging import compute_window

    index = 12
    window = compute_window(mr_volume)
    result = _segmenter(clip_bundle, sam_model).segment_volume(mr_volume, "brain tumor", slice_range=(index, index + 1))
    single = _segmenter(clip_bundle, sam_model, window=window).segment(mr_volume[index], "brain tumor")

    assert np.array_equal(result.mask[index], single.mask.astype(np.uint8))
    assert np.allclose(result.saliency[index], single.saliency)


def test_volume_lists_partition_processed(clip_bundle, sam_model, mr_volume):
    result = _segmenter(clip_bundle, sam_model).segment_volume(mr_volume, "brain tumor", slice_range=(10, 14))
    listed = sorted(result.found_slices + result.not_found_slices + result.skipped_slices)

    assert listed == result.processed_slices
    assert result.cancelled is False
    for index in result.found_slices:
        assert result.mask[index].any()
    for index in result.not_found_slices:
        assert not result.mask[index].any()


def test_volume_cancel_after_two_slices(clip_bundle, sam_model, mr_volume):
    progress_calls: list[tuple[int, int, str]] = []

    def progress(done: int, total: int, message: str) -> None:
        progress_calls.append((done, total, message))

    def cancel() -> bool:
        return len(progress_calls) >= 2

    result = _segmenter(clip_bundle, sam_model).segment_volume(
        mr_volume, "brain tumor", slice_range=(8, 14), progress=progress, cancel=cancel
    )

    assert result.cancelled is True
    assert result.processed_slices == [8, 9]
    assert [call[:2] for call in progress_calls] == [(1, 6), (2, 6)]
    assert not result.mask[10:].any()
    assert not result.saliency[10:].any()
    assert result.saliency[8:10].any()


def test_volume_progress_per_slice(clip_bundle, sam_model, mr_volume):
    progress_calls: list[tuple[int, int]] = []
    _segmenter(clip_bundle, sam_model).segment_volume(
        mr_volume, "brain tumor", slice_range=(5, 8), progress=lambda done, total, _: progress_calls.append((done, total))
    )
    assert progress_calls == [(1, 3), (2, 3), (3, 3)]


def test_volume_constant_slices_not_found(clip_bundle, sam_model, mr_volume):
    volume = mr_volume[8:11].copy()
    volume[1] = volume.min()
    result = _segmenter(clip_bundle, sam_model).segment_volume(volume, "brain tumor")

    assert 1 in result.not_found_slices
    assert 1 not in result.clip_scores
    assert not result.mask[1].any()
    assert result.processed_slices == [0, 1, 2]


def test_volume_presence_threshold_skips_low_scores(clip_bundle, sam_model, mr_volume):
    """Rule: with presence_threshold set, a slice whose whole-slice CLIP score is below it is skipped."""
    slice_range = (8, 13)
    scores = _segmenter(clip_bundle, sam_model).segment_volume(mr_volume, "brain tumor", slice_range=slice_range)
    threshold = float(np.median(list(scores.clip_scores.values())))
    expected_skipped = sorted(index for index, score in scores.clip_scores.items() if score < threshold)

    result = _segmenter(clip_bundle, sam_model, presence_threshold=threshold).segment_volume(
        mr_volume, "brain tumor", slice_range=slice_range
    )

    assert expected_skipped
    assert result.skipped_slices == expected_skipped
    for index in result.skipped_slices:
        assert not result.mask[index].any()
        assert not result.saliency[index].any()
    for index in set(result.processed_slices) - set(result.skipped_slices):
        assert result.saliency[index].any()


def test_volume_given_window_used(clip_bundle, sam_model, mr_volume):
    """An explicit window below every voxel turns each slice white, so no slice has contrast."""
    low = float(mr_volume.min()) - 100.0
    result = _segmenter(clip_bundle, sam_model).segment_volume(
        mr_volume, "brain tumor", slice_range=(10, 12), window=(low - 10.0, low)
    )
    assert result.not_found_slices == [10, 11]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axis": 3}, "axis"),
        ({"slice_range": (5, 5)}, "slice_range"),
        ({"slice_range": (0, 99)}, "slice_range"),
    ],
)
def test_volume_rejects_bad_arguments(clip_bundle, sam_model, mr_volume, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        _segmenter(clip_bundle, sam_model).segment_volume(mr_volume, "brain tumor", **kwargs)


def test_volume_rejects_thin_slices(clip_bundle, sam_model, mr_volume):
    with pytest.raises(InvalidInputError, match="axis"):
        _segmenter(clip_bundle, sam_model).segment_volume(mr_volume[:4], "brain tumor", axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# Overlay (the CLI's review image)


def test_saliency_to_uint8_scales_and_clips():
    from MedCLIPSAMLib.overlay import saliency_to_uint8

    converted = saliency_to_uint8(np.array([[0.0, 0.5, 1.0], [-0.2, 1.7, np.nan]]))
    assert converted.dtype == np.uint8
    assert converted.tolist() == [[0, 128, 255], [0, 255, 0]]


def test_overlay_draws_contour_and_box(ultrasound):
    from MedCLIPSAMLib.overlay import DEFAULT_BOX_COLOR, DEFAULT_CONTOUR_COLOR, render_overlay

    rgb = np.ascontiguousarray(ultrasound[:, :, :3])
    original = rgb.copy()
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    mask[100:200, 150:300] = True
    boxes = np.array([[20, 30, 80, 90]])
    overlay = render_overlay(rgb, np.zeros(rgb.shape[:2], np.float32), mask, boxes, alpha=0.0)

    assert overlay.shape == rgb.shape
    assert overlay.dtype == np.uint8
    assert np.array_equal(rgb, original)
    assert overlay[100, 200].tolist() == list(DEFAULT_CONTOUR_COLOR)
    assert overlay[101, 200].tolist() == list(DEFAULT_CONTOUR_COLOR)
    assert np.array_equal(overlay[150, 225], rgb[150, 225])
    assert overlay[30, 50].tolist() == list(DEFAULT_BOX_COLOR)
    assert overlay[60, 80].tolist() == list(DEFAULT_BOX_COLOR)
    assert np.array_equal(overlay[60, 50], rgb[60, 50])


def test_overlay_blends_heat_map(ultrasound):
    from MedCLIPSAMLib.overlay import render_overlay

    rgb = np.ascontiguousarray(ultrasound[:, :, :3])
    saliency = np.ones(rgb.shape[:2], np.float32)
    overlay = render_overlay(rgb, saliency, alpha=1.0, colormap="jet")
    # "jet" maps 1.0 to dark red (0.5, 0, 0).
    assert overlay[10, 10].tolist() == [128, 0, 0]


def test_overlay_rejects_mismatched_mask(ultrasound):
    from MedCLIPSAMLib.overlay import render_overlay

    with pytest.raises(InvalidInputError, match="mask shape"):
        render_overlay(np.ascontiguousarray(ultrasound[:, :, :3]), mask=np.zeros((5, 5), bool))

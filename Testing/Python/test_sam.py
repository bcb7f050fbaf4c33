"""Tests of SamBoxSegmenter on the tiny SAM checkpoint and a real ultrasound image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.models import load_sam
from MedCLIPSAMLib.sam import SamBoxSegmenter

# Boxes of different size and position on the ultrasound image (XYXY, inclusive maxima).
BOXES = np.array([[40, 30, 200, 180], [300, 200, 520, 420], [150, 250, 260, 330]], dtype=np.int64)

# Pixels allowed to differ between the batched union and per-box masks (float32 rounding at logits near 0).
MAX_THRESHOLD_FLIPS = 20


@pytest.fixture(scope="module")
def sam_model(tiny_sam_checkpoint):
    return load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ultrasound_rgb(shared_data) -> np.ndarray:
    path = shared_data / "breast_ultrasound" / "images" / "benign (101).png"
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def _count_predict_calls(segmenter: SamBoxSegmenter, monkeypatch) -> list[int]:
    """Wrap the predictor's predict_torch and return a list that receives the box count of every call."""
    calls: list[int] = []
    original = segmenter.predictor.predict_torch

    def counting_predict_torch(*args, **kwargs):
        calls.append(int(kwargs["boxes"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter.predictor, "predict_torch", counting_predict_torch)
    return calls


def _count_encoder_forwards(sam_model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    # The neck closes every embedding, whether the encoder's own forward or sam_encoder.encode_image runs it.
    forwards: list[int] = []
    handle = sam_model.image_encoder.neck.register_forward_hook(lambda *_: forwards.append(1))
    return forwards, handle


def test_all_boxes_in_one_call(sam_model, ultrasound_rgb, monkeypatch):
    segmenter = SamBoxSegmenter(sam_model)
    calls = _count_predict_calls(segmenter, monkeypatch)
    segmenter.set_image(ultrasound_rgb)
    mask = segmenter.segment_boxes(BOXES)

    assert calls == [len(BOXES)]
    assert segmenter.call_count == 1
    assert mask.shape == ultrasound_rgb.shape[:2]
    assert mask.dtype == bool


def test_union_equals_or_of_single_boxes(sam_model, ultrasound_rgb):
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb)
    union = segmenter.segment_boxes(BOXES)
    separate = [segmenter.segment_boxes(box[None]) for box in BOXES]

    expected = np.logical_or.reduce(separate)
    # The decoder's float32 results depend slightly on the batch size, so pixels whose logit is within about 1e-7
    # of the threshold may flip. Leaving any one of these boxes out of the union changes at least 900 pixels.
    mismatches = int(np.count_nonzero(union != expected))
    assert mismatches <= MAX_THRESHOLD_FLIPS
    # The check is only meaningful when the single-box masks differ from each other.
    assert not np.array_equal(separate[0], separate[1])


def test_union_matches_predictor_threshold(sam_model, ultrasound_rgb):
    """The union uses SAM's own threshold: logits > mask_threshold (0)."""
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb)
    mask = segmenter.segment_boxes(BOXES[:1])

    masks, _, _ = segmenter.predictor.predict(box=BOXES[0].astype(np.float64), multimask_output=False)
    assert np.array_equal(mask, masks[0])


def test_no_boxes_skip_sam(sam_model, ultrasound_rgb, monkeypatch):
    segmenter = SamBoxSegmenter(sam_model)
    calls = _count_predict_calls(segmenter, monkeypatch)
    segmenter.set_image(ultrasound_rgb)
    mask = segmenter.segment_boxes(np.zeros((0, 4), dtype=np.int64))

    assert calls == []
    assert segmenter.call_count == 0
    assert mask.shape == ultrasound_rgb.shape[:2]
    assert not mask.any()


def test_embedding_reused_for_box_sets(sam_model, ultrasound_rgb):
    forwards, handle = _count_encoder_forwards(sam_model)
    try:
        segmenter = SamBoxSegmenter(sam_model)
        first = segmenter.set_image(ultrasound_rgb)
        segmenter.segment_boxes(BOXES[:1])
        second = segmenter.set_image(ultrasound_rgb)
        segmenter.segment_boxes(BOXES[1:])
        third = segmenter.set_image(ultrasound_rgb.copy())
        segmenter.segment_boxes(BOXES)
    finally:
        handle.remove()

    assert first is True
    assert second is False
    assert third is False
    assert segmenter.embedding_count == 1
    assert len(forwards) == 1
    assert segmenter.call_count == 3


def test_changed_image_embedded_again(sam_model, ultrasound_rgb):
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb)
    changed = ultrasound_rgb.copy()
    changed[0, 0, 0] ^= 1
    recomputed = segmenter.set_image(changed)

    assert recomputed is True
    assert segmenter.embedding_count == 2


def test_image_key_controls_reuse(sam_model, ultrasound_rgb):
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb, image_key="slice-3")
    segmenter.set_image(ultrasound_rgb, image_key="slice-3")
    segmenter.set_image(ultrasound_rgb, image_key="slice-4")

    assert segmenter.embedding_count == 2


def test_mask_size_follows_new_image(sam_model, ultrasound_rgb):
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb)
    crop = np.ascontiguousarray(ultrasound_rgb[:200, :300])
    segmenter.set_image(crop)
    mask = segmenter.segment_boxes(np.array([[10, 10, 100, 150]]))

    assert mask.shape == (200, 300)


def test_segment_before_set_image_raises(sam_model):
    segmenter = SamBoxSegmenter(sam_model)
    with pytest.raises(InvalidInputError, match="set_image"):
        segmenter.segment_boxes(BOXES)


@pytest.mark.parametrize(
    "boxes",
    [
        np.array([10, 10, 50, 50]),
        np.array([[10, 10, 50]]),
        np.array([[50, 10, 10, 50]]),
        np.array([[10.0, np.nan, 50.0, 50.0]]),
    ],
    ids=["one-dimensional", "three-columns", "x-max-below-x-min", "nan"],
)
def test_invalid_boxes_raise(sam_model, ultrasound_rgb, boxes):
    segmenter = SamBoxSegmenter(sam_model)
    segmenter.set_image(ultrasound_rgb)
    with pytest.raises(InvalidInputError):
        segmenter.segment_boxes(boxes)


@pytest.mark.parametrize(
    "image",
    [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 4), np.uint8)],
    ids=["gray", "float", "rgba"],
)
def test_non_rgb_uint8_image_raises(sam_model, image):
    segmenter = SamBoxSegmenter(sam_model)
    with pytest.raises(InvalidInputError, match="uint8"):
        segmenter.set_image(image)


def test_memory_bound_splits_calls_same_union(sam_model, ultrasound_rgb, monkeypatch):
    one_call = SamBoxSegmenter(sam_model)
    one_call.set_image(ultrasound_rgb)
    expected = one_call.segment_boxes(BOXES)

    # A bound of one box's masks forces one decoder call per box.
    height, width = ultrasound_rgb.shape[:2]
    side = sam_model.image_encoder.img_size
    chunked = SamBoxSegmenter(sam_model, max_mask_bytes=4 * (side * side + height * width))
    calls = _count_predict_calls(chunked, monkeypatch)
    chunked.set_image(ultrasound_rgb)
    mask = chunked.segment_boxes(BOXES)

    assert calls == [1, 1, 1]
    assert np.count_nonzero(mask != expected) <= MAX_THRESHOLD_FLIPS

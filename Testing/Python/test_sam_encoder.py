"""Tests of `MedCLIPSAMLib.sam_encoder`: the piecewise attention must give segment-anything's embedding and leave
the model as it was."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from MedCLIPSAMLib import sam_encoder
from MedCLIPSAMLib.metrics import dice
from MedCLIPSAMLib.sam import SamBoxSegmenter
from MedCLIPSAMLib.tiny import build_tiny_sam_model


def _encoder_settings(*, window_size: int = 4, use_rel_pos: bool = True, img_size: int = 256) -> dict:
    """Settings of a small `ImageEncoderViT` with one windowed and one global-attention block."""
    return {
        "depth": 2, "embed_dim": 32, "img_size": img_size, "mlp_ratio": 2.0,
        "norm_layer": partial(torch.nn.LayerNorm, eps=1e-6), "num_heads": 2, "patch_size": 16, "qkv_bias": True,
        "use_rel_pos": use_rel_pos, "global_attn_indexes": (1,), "window_size": window_size, "out_chans": 16,
    }


def _encoder(*, window_size: int = 4, use_rel_pos: bool = True, img_size: int = 256, seed: int = 0):
    """A small `ImageEncoderViT` with non-zero relative-position tables."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    settings = _encoder_settings(window_size=window_size, use_rel_pos=use_rel_pos, img_size=img_size)
    encoder = ImageEncoderViT(**settings).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            if block.attn.use_rel_pos:
                block.attn.rel_pos_h.normal_()
                block.attn.rel_pos_w.normal_()
    return encoder


def _images(size: int = 256, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("window_size", "use_rel_pos"),
    [(4, True), (5, True), (4, False)],
    ids=["windows", "padded-windows", "no-relative-positions"],
)
def test_matches_segment_anything_in_float32(window_size, use_rel_pos):
    encoder = _encoder(window_size=window_size, use_rel_pos=use_rel_pos)
    images = _images()
    with torch.inference_mode():
        expected = encoder(images)
        actual = sam_encoder.encode_image(encoder, images)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)


def test_small_pieces_give_the_same_embedding(monkeypatch):
    encoder = _encoder()
    images = _images()
    with torch.inference_mode():
        expected = sam_encoder.encode_image(encoder, images)
        # 16 x 16 tokens: the global block is cut into query slices, and the 4 x 4 windows no longer share a piece.
        monkeypatch.setattr(sam_encoder, "ATTENTION_PIECE_ELEMENTS", 1000)
        sliced = sam_encoder.encode_image(encoder, images)
    assert torch.allclose(sliced, expected, atol=1e-6, rtol=1e-6)


def test_resized_relative_position_table_matches():
    # A table whose length is not 2 * size - 1 is resized linearly, as segment-anything's get_rel_pos does.
    encoder = _encoder()
    attention = encoder.blocks[1].attn
    with torch.no_grad():
        attention.rel_pos_h = torch.nn.Parameter(torch.randn(21, attention.rel_pos_h.shape[1]))
        attention.rel_pos_w = torch.nn.Parameter(torch.randn(13, attention.rel_pos_w.shape[1]))
    images = _images(count=1)
    with torch.inference_mode():
        expected = encoder(images)
        actual = sam_encoder.encode_image(encoder, images)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_autocast_stays_close_to_float32():
    encoder = _encoder()
    images = _images(count=1)
    with torch.inference_mode():
        reference = encoder(images)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            original = encoder(images).float()
            pieces = sam_encoder.encode_image(encoder, images).float()
    original_error = float((original - reference).abs().max())
    pieces_error = float((pieces - reference).abs().max())
    cosine = torch.nn.functional.cosine_similarity(pieces.flatten(), reference.flatten(), dim=0)
    assert float(cosine) > 0.999
    # Scores are added and normalised in float32, so the result is not further from float32 than autocast's own.
    assert pieces_error <= 1.5 * original_error


def test_model_is_left_unchanged():
    encoder = _encoder()
    state = {name: value.clone() for name, value in encoder.state_dict().items()}
    forwards = {name: module.forward for name, module in encoder.named_modules()}
    classes = {name: type(module) for name, module in encoder.named_modules()}
    with torch.inference_mode():
        sam_encoder.encode_image(encoder, _images(count=1))
    assert {name: type(module) for name, module in encoder.named_modules()} == classes
    for name, module in encoder.named_modules():
        assert "forward" not in vars(module), name
        assert module.forward.__func__ is forwards[name].__func__, name
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_unknown_encoder_layout_runs_its_own_forward():
    from segment_anything.modeling import ImageEncoderViT

    class CountingEncoder(ImageEncoderViT):
        calls = 0

        def forward(self, x):
            CountingEncoder.calls += 1
            return super().forward(x)

    encoder = _encoder()
    counting = CountingEncoder(**_encoder_settings()).eval()
    counting.load_state_dict(encoder.state_dict())
    assert sam_encoder.supports_piecewise_attention(encoder)
    assert not sam_encoder.supports_piecewise_attention(counting)
    assert not sam_encoder.supports_piecewise_attention(torch.nn.Identity())
    with torch.inference_mode():
        output = sam_encoder.encode_image(counting, _images(count=1))
    assert CountingEncoder.calls == 1
    assert output.shape == (1, 16, 16, 16)


def test_piecewise_false_runs_the_encoders_forward():
    encoder = _encoder()
    calls = []
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            sam_encoder.encode_image(encoder, _images(count=1), piecewise=False)
            sam_encoder.encode_image(encoder, _images(count=1))
    finally:
        handle.remove()
    assert calls == [1]


def test_other_devices_run_the_encoders_forward():
    # Only CPU tensors take the piecewise path; the meta device plays the part of a GPU here.
    encoder = _encoder().to("meta")
    calls = []
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        output = sam_encoder.encode_image(encoder, torch.empty(1, 3, 256, 256, device="meta"))
    finally:
        handle.remove()
    assert calls == [1]
    assert output.shape == (1, 16, 16, 16)


def test_box_segmenter_embedding_and_masks_match_segment_anything(shared_data):
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        rgb = np.array(image.convert("RGB"))
    sam = build_tiny_sam_model()
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    boxes = np.array([[40, 30, 300, 250], [200, 150, 500, 420]])

    piecewise = SamBoxSegmenter(sam)
    reference = SamBoxSegmenter(sam, piecewise_attention=False)
    piecewise.set_image(rgb)
    reference.set_image(rgb)

    assert piecewise.predictor.original_size == reference.predictor.original_size
    assert piecewise.predictor.input_size == reference.predictor.input_size
    assert piecewise.predictor.features.dtype == torch.float32
    assert torch.allclose(piecewise.predictor.features, reference.predictor.features, atol=1e-5, rtol=1e-5)
    assert dice(piecewise.segment_boxes(boxes), reference.segment_boxes(boxes)) >= 0.999

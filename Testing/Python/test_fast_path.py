"""Tests of the fast path: bfloat16 CLIP and SAM encoder against float32, and the work each optimisation skips.

Fidelity is checked with the tiny random-weight models on real images: bfloat16 saliency must correlate with
float32 at r >= 0.99 and masks must overlap at Dice >= 0.98. The tiny models' maps are smooth enough for these
thresholds to mean something, but they do not stand in for the pre-trained models. The benchmark
(bench/bench_pipeline.py) repeats the check with the real-size architectures.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from MedCLIPSAMLib import imaging, saliency
from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.metrics import dice
from MedCLIPSAMLib.models import load_clip, load_sam
from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter
from MedCLIPSAMLib.sam import SamBoxSegmenter

PROMPT = "breast tumor"
MIN_SALIENCY_PEARSON = 0.99
MIN_MASK_DICE = 0.98
TOP_K = 16

IMAGES = {
    "ultrasound": ("breast_ultrasound", "benign (101).png"),
    "brain_mri": ("brain_mri", "13.png"),
    "chest_xray": ("chest_xray", "kjr-21-e25-g001-l-a.jpg"),
}


@pytest.fixture(scope="module")
def clip_float32(tiny_clip_id):
    return load_clip(tiny_clip_id, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clip_bfloat16(tiny_clip_id):
    return load_clip(tiny_clip_id, device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sam_model(tiny_sam_checkpoint):
    return load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")


@pytest.fixture(scope="module", params=sorted(IMAGES))
def rgb(request, shared_data) -> np.ndarray:
    folder, name = IMAGES[request.param]
    with Image.open(shared_data / folder / "images" / name) as image:
        return np.array(image.convert("RGB"))


def _pearson(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.corrcoef(first.ravel().astype(np.float64), second.ravel().astype(np.float64))[0, 1])


def _quarter_boxes(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    return np.array(
        [[width // 8, height // 8, width // 2, height // 2], [width // 3, height // 3, width - 10, height - 10]]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Fidelity of bfloat16 against float32


def test_bfloat16_gscorecam_matches_float32(clip_float32, clip_bfloat16, rgb):
    tensor, _ = imaging.clip_input(rgb, clip_float32.mean, clip_float32.std)
    exact = saliency.gscorecam(clip_float32, tensor, saliency.encode_prompt(clip_float32, PROMPT), top_k=TOP_K)
    weights = saliency.gscorecam(clip_bfloat16, tensor, saliency.encode_prompt(clip_bfloat16, PROMPT), top_k=TOP_K)
    autocast = saliency.gscorecam(
        clip_float32, tensor, saliency.encode_prompt(clip_float32, PROMPT), top_k=TOP_K, compute_dtype=torch.bfloat16
    )

    assert exact.std() > 0
    assert _pearson(exact, weights) >= MIN_SALIENCY_PEARSON
    assert _pearson(exact, autocast) >= MIN_SALIENCY_PEARSON


def test_compute_dtype_autocasts_image_tower(clip_float32, shared_data):
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        tensor, _ = imaging.clip_input(np.array(image.convert("RGB")), clip_float32.mean, clip_float32.std)
    text = saliency.encode_prompt(clip_float32, PROMPT)
    dtypes: list[torch.dtype] = []
    handle = clip_float32.model.visual.trunk.blocks[0].mlp.fc1.register_forward_hook(
        lambda _module, _inputs, output: dtypes.append(output.dtype)
    )
    try:
        saliency.clip_score(clip_float32, tensor, text)
        saliency.clip_score(clip_float32, tensor, text, compute_dtype=torch.bfloat16)
    finally:
        handle.remove()

    assert dtypes == [torch.float32, torch.bfloat16]
    assert {parameter.dtype for parameter in clip_float32.model.parameters()} == {torch.float32}


def test_invalid_compute_dtype_rejected(clip_float32, shared_data):
    tensor = torch.zeros(1, 3, 224, 224)
    text = saliency.encode_prompt(clip_float32, PROMPT)
    with pytest.raises(InvalidInputError, match="compute_dtype"):
        saliency.gscorecam(clip_float32, tensor, text, compute_dtype=torch.int8)


def test_bfloat16_sam_encoder_matches_float32(sam_model, rgb):
    exact = SamBoxSegmenter(sam_model)
    fast = SamBoxSegmenter(sam_model, encoder_dtype=torch.bfloat16)
    exact.set_image(rgb)
    fast.set_image(rgb)
    exact_mask = exact.segment_boxes(_quarter_boxes(rgb))
    fast_mask = fast.segment_boxes(_quarter_boxes(rgb))

    assert exact_mask.any()
    assert dice(fast_mask, exact_mask) >= MIN_MASK_DICE


@pytest.mark.parametrize("image_name", ["ultrasound", "brain_mri"])
def test_bfloat16_pipeline_matches_float32(clip_float32, sam_model, shared_data, image_name):
    folder, name = IMAGES[image_name]
    with Image.open(shared_data / folder / "images" / name) as image:
        rgb = np.array(image.convert("RGB"))
    exact = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(top_k=TOP_K)).segment(rgb, PROMPT)
    fast = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(top_k=TOP_K, precision="bfloat16")).segment(
        rgb, PROMPT
    )

    assert exact.found
    assert _pearson(exact.saliency, fast.saliency) >= MIN_SALIENCY_PEARSON
    assert dice(fast.mask, exact.mask) >= MIN_MASK_DICE


def test_bfloat16_batch_size_does_not_matter(clip_bfloat16, rgb):
    tensor, _ = imaging.clip_input(rgb, clip_bfloat16.mean, clip_bfloat16.std)
    text = saliency.encode_prompt(clip_bfloat16, PROMPT)
    one_at_a_time = saliency.gscorecam(clip_bfloat16, tensor, text, top_k=TOP_K, batch_size=1)
    batched = saliency.gscorecam(clip_bfloat16, tensor, text, top_k=TOP_K, batch_size=TOP_K)

    assert _pearson(one_at_a_time, batched) >= MIN_SALIENCY_PEARSON


# ---------------------------------------------------------------------------------------------------------------------
# SAM encoder precision


def test_sam_autocast_runs_encoder_in_bfloat16(sam_model, shared_data):
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        rgb = np.array(image.convert("RGB"))
    block_dtypes: list[torch.dtype] = []
    handle = sam_model.image_encoder.blocks[0].mlp.register_forward_hook(
        lambda _module, _inputs, output: block_dtypes.append(output.dtype)
    )
    try:
        segmenter = SamBoxSegmenter(sam_model, encoder_dtype=torch.bfloat16)
        segmenter.set_image(rgb)
    finally:
        handle.remove()

    assert block_dtypes == [torch.bfloat16]
    assert segmenter.predictor.features.dtype == torch.float32
    assert {parameter.dtype for parameter in sam_model.parameters()} == {torch.float32}


def test_sam_float32_encoder_has_no_autocast(sam_model, shared_data):
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        rgb = np.array(image.convert("RGB"))
    block_dtypes: list[torch.dtype] = []
    handle = sam_model.image_encoder.blocks[0].mlp.register_forward_hook(
        lambda _module, _inputs, output: block_dtypes.append(output.dtype)
    )
    try:
        SamBoxSegmenter(sam_model).set_image(rgb)
    finally:
        handle.remove()

    assert block_dtypes == [torch.float32]


def test_sam_invalid_encoder_dtype_rejected(sam_model):
    with pytest.raises(InvalidInputError, match="encoder dtype"):
        SamBoxSegmenter(sam_model, encoder_dtype=torch.int8)


@pytest.mark.parametrize(
    ("clip_name", "precision", "expected"),
    [
        ("bfloat16", "auto", torch.bfloat16),
        ("bfloat16", "float32", torch.float32),
        ("float32", "bfloat16", torch.bfloat16),
    ],
)
def test_config_precision_selects_encoder_dtype(clip_float32, clip_bfloat16, sam_model, clip_name, precision, expected):
    clip = clip_bfloat16 if clip_name == "bfloat16" else clip_float32
    segmenter = ZeroShotSegmenter(clip, sam_model, ZeroShotConfig(precision=precision))
    assert segmenter.sam.encoder_dtype == expected


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_follows_the_hardware(clip_float32, sam_model, monkeypatch, native, expected):
    import MedCLIPSAMLib.pipeline as pipeline

    devices = []
    monkeypatch.setattr(pipeline, "native_bfloat16", lambda device: devices.append(str(device)) or native)
    segmenter = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig())
    assert ZeroShotConfig().precision == "auto"
    assert segmenter.compute_dtype == expected
    assert segmenter.sam.encoder_dtype == expected
    assert devices == ["cpu"]


def test_float32_precision_ignores_the_hardware(clip_float32, sam_model, monkeypatch):
    import MedCLIPSAMLib.pipeline as pipeline

    monkeypatch.setattr(pipeline, "native_bfloat16", lambda device: True)
    segmenter = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(precision="float32"))
    assert segmenter.compute_dtype == torch.float32
    assert segmenter.sam.encoder_dtype == torch.float32


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu sse2 avx512f avx512_bf16", True), ("fpu sse2 amx_bf16 amx_tile", True), ("fpu sse2 avx2 avx512f", False)],
)
def test_native_bfloat16_reads_cpu_flags(tmp_path, monkeypatch, flags, expected):
    import MedCLIPSAMLib.models as models

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if str(path) == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert models.native_bfloat16("cpu") is expected
    assert models.native_bfloat16(torch.device("cpu")) is expected


def test_native_bfloat16_without_cpuinfo(monkeypatch):
    import MedCLIPSAMLib.models as models

    def missing(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", missing)
    assert models.native_bfloat16("cpu") is False


def test_config_rejects_unknown_precision():
    with pytest.raises(InvalidInputError, match="precision"):
        ZeroShotConfig(precision="int8")


# ---------------------------------------------------------------------------------------------------------------------
# Work that the pipeline must not repeat or run


def test_masked_forwards_run_without_grad_or_hooks(clip_float32, shared_data):
    """Only the first pass of gScoreCAM needs a gradient and the activation hook; the masked forwards need neither."""
    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        tensor, _ = imaging.clip_input(np.array(image.convert("RGB")), clip_float32.mean, clip_float32.std)
    text = saliency.encode_prompt(clip_float32, PROMPT)
    trunk = clip_float32.model.visual.trunk
    target = trunk.blocks[-1].norm2
    passes: list[tuple[bool, int, int]] = []

    def record(_module, inputs):
        passes.append((torch.is_grad_enabled(), len(target._forward_hooks), int(inputs[0].shape[0])))

    handle = trunk.register_forward_pre_hook(record)
    try:
        saliency.gscorecam(clip_float32, tensor, text, top_k=10, batch_size=4)
    finally:
        handle.remove()

    first, masked = passes[0], passes[1:]
    assert first[:2] == (True, 1)
    assert [batch for _, _, batch in masked] == [4, 4, 2]
    assert all(not grad and hooks == 0 for grad, hooks, _ in masked)


def test_volume_encodes_prompt_once(clip_float32, sam_model, shared_data):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data / "volumes" / "pyradiomics_brain1" / "brain1_image.nrrd"))
    volume = np.ascontiguousarray(sitk.GetArrayFromImage(image)[10:13, ::4, ::4])
    calls: list[int] = []
    original = clip_float32.model.encode_text

    def counting_encode_text(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    clip_float32.model.encode_text = counting_encode_text
    try:
        ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(top_k=4)).segment_volume(
            volume, "glioma seen once in this test"
        )
    finally:
        del clip_float32.model.encode_text

    assert len(calls) == 1


def test_absent_slices_skip_saliency_and_sam(clip_float32, sam_model, shared_data, monkeypatch):
    """Rule: a slice whose CLIP score is below presence_threshold gets no saliency map and no SAM embedding."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data / "volumes" / "pyradiomics_brain1" / "brain1_image.nrrd"))
    volume = np.ascontiguousarray(sitk.GetArrayFromImage(image)[10:14, ::4, ::4])
    saliency_calls: list[int] = []
    original = saliency.gscorecam

    def counting_gscorecam(*args, **kwargs):
        saliency_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(saliency, "gscorecam", counting_gscorecam)
    scores = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(top_k=4)).segment_volume(volume, PROMPT)
    highest = max(scores.clip_scores, key=scores.clip_scores.get)
    saliency_calls.clear()

    threshold = scores.clip_scores[highest]
    segmenter = ZeroShotSegmenter(clip_float32, sam_model, ZeroShotConfig(top_k=4, presence_threshold=threshold))
    result = segmenter.segment_volume(volume, PROMPT)

    assert result.skipped_slices == sorted(set(range(4)) - {highest})
    assert len(saliency_calls) == 1
    assert segmenter.sam.embedding_count <= 1
    assert math.isclose(result.clip_scores[highest], threshold)


def test_cli_bfloat16_reports_precision(tiny_clip_id, tiny_sam_checkpoint, shared_data, tmp_path):
    image = shared_data / "breast_ultrasound" / "images" / "benign (101).png"
    argv = [
        "segment", str(image), "--prompt", PROMPT, "--output", str(tmp_path), "--top-k", "8", "--dtype", "bfloat16",
        "--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "benign (101).json").read_text(encoding="utf-8"))
    assert report["precision"] == "bfloat16"


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_cli_auto_reports_the_precision_it_chose(
    tiny_clip_id, tiny_sam_checkpoint, shared_data, tmp_path, monkeypatch, native, expected
):
    import MedCLIPSAMLib.pipeline as pipeline

    monkeypatch.setattr(pipeline, "native_bfloat16", lambda device: native)
    image = shared_data / "breast_ultrasound" / "images" / "benign (101).png"
    argv = [
        "segment", str(image), "--prompt", PROMPT, "--output", str(tmp_path), "--top-k", "8",
        "--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "benign (101).json").read_text(encoding="utf-8"))
    assert report["precision"] == expected
    assert report["clip_dtype"] == "float32"

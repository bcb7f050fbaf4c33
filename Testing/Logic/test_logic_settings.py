"""SegmenterSettings reach the zero-shot pipeline that the Logic builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedCLIPSAMModule.logic import MedCLIPSAMLogic, SegmenterSettings


def _settings(tiny_clip_id, tiny_sam_checkpoint, **changes) -> SegmenterSettings:
    return SegmenterSettings(
        clipModelId=tiny_clip_id, samType="tiny", samCheckpoint=str(tiny_sam_checkpoint), device="cpu", topK=4,
        **changes,
    )


def test_settings_set_pipeline_config(scene, tiny_clip_id, tiny_sam_checkpoint):
    logic = MedCLIPSAMLogic(scene)

    segmenter = logic.getSegmenter(
        _settings(tiny_clip_id, tiny_sam_checkpoint, crfTau=1.2, presenceThreshold=3.0, precision="float32")
    )

    assert segmenter.config.top_k == 4
    assert segmenter.config.crf_tau == 1.2
    assert segmenter.config.presence_threshold == 3.0
    assert segmenter.compute_dtype == torch.float32


def test_default_precision_is_auto(scene, tiny_clip_id, tiny_sam_checkpoint):
    segmenter = MedCLIPSAMLogic(scene).getSegmenter(_settings(tiny_clip_id, tiny_sam_checkpoint))
    assert SegmenterSettings().precision == "auto"
    assert segmenter.config.precision == "auto"


def test_bfloat16_setting_builds_new_segmenter(scene, tiny_clip_id, tiny_sam_checkpoint):
    logic = MedCLIPSAMLogic(scene)
    first = logic.getSegmenter(_settings(tiny_clip_id, tiny_sam_checkpoint, precision="float32"))

    fast = logic.getSegmenter(_settings(tiny_clip_id, tiny_sam_checkpoint, precision="bfloat16"))

    assert fast is not first
    assert fast.compute_dtype == torch.bfloat16
    assert fast.clip.dtype == torch.float32


def _segment_tag(segment, key: str) -> str | None:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _ultrasound_volume_node(scene, shared_data):
    from PIL import Image

    from MedCLIPSAMModule import mrml

    with Image.open(shared_data / "breast_ultrasound" / "images" / "benign (101).png") as image:
        gray = np.array(image.convert("L"))
    volume = np.stack([gray, gray])
    return mrml.addScalarVolumeFromArray(scene, volume, np.eye(4), "ultrasound")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_segment_records_precision(scene, shared_data, tiny_clip_id, tiny_sam_checkpoint, precision):
    from MedCLIPSAMModule.logic import SEGMENT_TAG_PRECISION

    logic = MedCLIPSAMLogic(scene)
    settings = _settings(tiny_clip_id, tiny_sam_checkpoint, precision=precision)
    outcome = logic.segmentVolume(
        _ultrasound_volume_node(scene, shared_data), "breast tumor", settings=settings, showSaliency=False
    )

    segment = outcome.segmentationNode.GetSegmentation().GetSegment(outcome.segmentId)
    assert outcome.precision == precision
    assert _segment_tag(segment, SEGMENT_TAG_PRECISION) == precision
    assert outcome.summary().endswith(f"computed in {precision}.")


def test_custom_segmenter_records_no_precision(scene, shared_data, threshold_segmenter):
    from MedCLIPSAMModule.logic import SEGMENT_TAG_PRECISION

    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)
    outcome = logic.segmentVolume(_ultrasound_volume_node(scene, shared_data), "breast tumor", showSaliency=False)

    segment = outcome.segmentationNode.GetSegmentation().GetSegment(outcome.segmentId)
    assert outcome.precision is None
    assert _segment_tag(segment, SEGMENT_TAG_PRECISION) is None
    assert "computed in" not in outcome.summary()

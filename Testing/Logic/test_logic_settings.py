"""SegmenterSettings reach the zero-shot pipeline that the Logic builds."""

from __future__ import annotations

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

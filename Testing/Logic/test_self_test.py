"""The module's self-test body on slicer-core: the same code Slicer's Test class runs inside the application."""

from __future__ import annotations

from MedCLIPSAMModule.selftest import SELF_TEST_PROMPT, runSelfTest


def test_self_test_passes(scene, tiny_clip_id, tiny_sam_checkpoint, tmp_path):
    steps = []

    logic = runSelfTest(scene, tmp_path, tiny_clip_id, str(tiny_sam_checkpoint), log=steps.append)

    assert steps[-1] == "Self-test passed"
    assert logic.segmenter is not None
    assert scene.GetFirstNodeByName("MedCLIPSAM self-test segmentation") is not None
    assert scene.GetFirstNodeByName(f"{SELF_TEST_PROMPT} saliency") is not None

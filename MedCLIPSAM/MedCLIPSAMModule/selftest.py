"""Body of the module's self-test, shared by Slicer's Test class and the pytest Logic tests.

It runs the Logic end to end with the real zero-shot pipeline on tiny models (random weights in the real file
formats, built by `MedCLIPSAMLib.tiny`), so it needs no download and passes offline inside Slicer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import mrml
from .logic import MedCLIPSAMLogic, SegmenterSettings

logger = logging.getLogger(__name__)

SELF_TEST_PROMPT = "tumor"
SELF_TEST_SLICE_RANGE = (5, 8)
"""Half-open range of axial slices the self-test segments (three slices keep it quick on a CPU)."""


class SelfTestError(AssertionError):
    """A self-test check that failed."""


def _check(condition: bool, message: str) -> None:
    # Explicit raise instead of assert, so the checks also run under `python -O`.
    if not condition:
        raise SelfTestError(message)


def _syntheticVolume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return a [K, J, I] int16 volume (noise plus a bright ellipsoid) and an oblique 4x4 IJK-to-RAS matrix."""
    generator = np.random.default_rng(seed)
    k, j, i = np.mgrid[0:12, 0:48, 0:56]
    ellipsoid = ((k - 6) / 5.0) ** 2 + ((j - 22) / 12.0) ** 2 + ((i - 30) / 15.0) ** 2 <= 1.0
    volume = generator.normal(100.0, 20.0, size=k.shape) + 400.0 * ellipsoid
    angle = np.deg2rad(20.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = rotation @ np.diag([0.9, 0.9, 3.0])
    ijkToRas[:3, 3] = (-25.0, -20.0, 12.0)
    return volume.astype(np.int16), ijkToRas


def buildTinyModels(folder: str | Path) -> tuple[str, str]:
    """Write the tiny BiomedCLIP folder and SAM checkpoint into `folder`; returns (clip model id, SAM path)."""
    from MedCLIPSAMLib.tiny import build_tiny_biomedclip, build_tiny_sam

    folder = Path(folder)
    clipFolder = build_tiny_biomedclip(folder / "tiny_biomedclip", seed=0)
    samPath = build_tiny_sam(folder / "sam_tiny.pth", seed=0)
    return f"local-dir:{clipFolder}", str(samPath)


def runSelfTest(scene, workFolder: str | Path, clipModelId: str | None = None, samCheckpoint: str | None = None,
                log=logger.info) -> MedCLIPSAMLogic:
    """Segment a synthetic oblique volume into an existing segmentation and check the scene afterwards.

    Args:
        scene: MRML scene to work in (``slicer.mrmlScene`` inside Slicer).
        workFolder: Writable folder for the tiny models.
        clipModelId, samCheckpoint: Already built tiny models; None builds them in `workFolder`.
        log: Called with one line per step.

    Returns:
        The Logic used, with its cached segmenter.

    Raises:
        SelfTestError: a check failed; the message names it.
    """
    if clipModelId is None or samCheckpoint is None:
        log("Building tiny models")
        clipModelId, samCheckpoint = buildTinyModels(workFolder)

    volume, ijkToRas = _syntheticVolume()
    inputNode = mrml.addScalarVolumeFromArray(scene, volume, ijkToRas, "MedCLIPSAM self-test volume")
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedCLIPSAM self-test segmentation")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
    userMask = np.zeros(volume.shape, dtype=np.uint8)
    userMask[2:10, 30:40, 5:20] = 1
    userSegmentId = mrml.writeSegmentFromMask(segmentationNode, userMask, ijkToRas, "user segment")

    logic = MedCLIPSAMLogic(scene)
    settings = SegmenterSettings(
        clipModelId=clipModelId, samType="tiny", samCheckpoint=str(samCheckpoint), device="cpu", topK=4
    )
    reports = []
    log("Segmenting")
    outcome = logic.segmentVolume(
        inputNode, SELF_TEST_PROMPT, segmentationNode=segmentationNode, axis="axial",
        sliceRange=SELF_TEST_SLICE_RANGE, settings=settings,
        progress=lambda done, total, message: reports.append((done, total)),
    )

    expectedSlices = list(range(*SELF_TEST_SLICE_RANGE))
    _check(outcome.sliceAxis == 0, f"axial slices of this volume are along array axis 0, got {outcome.sliceAxis}")
    _check(outcome.processedSlices == expectedSlices, f"processed slices {outcome.processedSlices}")
    _check(len(reports) == len(expectedSlices), f"{len(reports)} progress reports for {len(expectedSlices)} slices")
    segmentation = segmentationNode.GetSegmentation()
    _check(segmentation.GetNumberOfSegments() == 2, f"{segmentation.GetNumberOfSegments()} segments, expected 2")
    _check(segmentation.GetSegment(outcome.segmentId).GetName() == SELF_TEST_PROMPT, "segment not named after prompt")
    mask = mrml.segmentMaskArray(segmentationNode, outcome.segmentId, inputNode)
    outside = np.ones(volume.shape[0], dtype=bool)
    outside[list(expectedSlices)] = False
    _check(not mask[outside].any(), "mask is set on slices outside the requested range")
    userAfter = mrml.segmentMaskArray(segmentationNode, userSegmentId, inputNode)
    _check(np.array_equal(userAfter, userMask), "the user's segment was modified")

    saliencyNode = outcome.saliencyNode
    _check(saliencyNode is not None, "no saliency volume written")
    _check(np.allclose(mrml.ijkToRasArray(saliencyNode), ijkToRas), "saliency volume geometry differs from input")
    saliency = mrml.arrayFromVolumeNode(saliencyNode)
    _check(saliency.shape == volume.shape, f"saliency shape {saliency.shape}, expected {volume.shape}")
    _check(float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0, "saliency outside [0, 1]")
    _check(float(saliency[list(expectedSlices)].max()) > 0.0, "saliency is empty on the processed slices")

    log("Re-running the same prompt")
    again = logic.segmentVolume(
        inputNode, SELF_TEST_PROMPT, segmentationNode=segmentationNode, sliceRange=(6, 7), settings=settings
    )
    _check(again.segmentId == outcome.segmentId, "re-running the prompt created a new segment")
    _check(again.saliencyNode is saliencyNode, "re-running the prompt created a new saliency volume")
    _check(segmentation.GetNumberOfSegments() == 2, "re-running the prompt changed the number of segments")
    log("Self-test passed")
    return logic

"""Fixtures of the Logic tests: a real MRML scene from the slicer-core wheel (no Qt, no Slicer application).

The scene gets the application logic, colour logic and Segmentations module logic that Slicer registers at start-up,
because binary labelmaps and .seg.nrrd storage do not work without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Logic tests need the slicer-core wheel")

MODULE_FOLDER = Path(__file__).resolve().parents[2] / "MedCLIPSAM"
if str(MODULE_FOLDER) not in sys.path:
    sys.path.insert(0, str(MODULE_FOLDER))

from MedCLIPSAMLib.pipeline import VolumeResult  # noqa: E402  (needs the repository on sys.path first)


@pytest.fixture
def scene():
    """An MRML scene with the logics that Slicer's Segmentations and Volumes modules register at start-up."""
    mrmlScene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(mrmlScene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(applicationLogic)
    colorLogic.SetMRMLScene(mrmlScene)
    applicationLogic.SetColorLogic(colorLogic)
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLApplicationLogic(applicationLogic)
    segmentationsLogic.SetMRMLScene(mrmlScene)
    applicationLogic.SetModuleLogic("Segmentations", segmentationsLogic)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(applicationLogic)
    volumesLogic.SetMRMLScene(mrmlScene)
    applicationLogic.SetModuleLogic("Volumes", volumesLogic)
    # Keep the logics alive as long as the scene: VTK objects without a Python reference are freed.
    mrmlScene._medclipsamLogics = (applicationLogic, colorLogic, segmentationsLogic, volumesLogic)
    yield mrmlScene
    mrmlScene.Clear(True)


class ThresholdSegmenter:
    """Deterministic segmenter with ZeroShotSegmenter's segment_volume signature, for geometry tests.

    Each processed slice gets mask = voxel > `threshold` and saliency = voxel / max, so the expected output of any
    volume is known exactly and a wrong axis, flip or geometry shows up voxel for voxel.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.calls: list[dict] = []

    def segment_volume(self, volume, prompt, axis=0, slice_range=None, progress=None, cancel=None, window=None):
        self.calls.append({"axis": axis, "slice_range": slice_range, "shape": volume.shape})
        start, stop = slice_range if slice_range is not None else (0, volume.shape[axis])
        mask = np.zeros(volume.shape, dtype=np.uint8)
        saliency = np.zeros(volume.shape, dtype=np.float32)
        peak = float(np.max(volume)) or 1.0
        result = VolumeResult(
            prompt=prompt, mask=mask, saliency=saliency, found_slices=[], not_found_slices=[], skipped_slices=[],
            processed_slices=[], cancelled=False, timings={}, axis=axis,
        )
        for done, index in enumerate(range(start, stop)):
            if cancel is not None and cancel():
                result.cancelled = True
                break
            selector = [slice(None)] * 3
            selector[axis] = index
            values = volume[tuple(selector)].astype(np.float32)
            mask[tuple(selector)] = values > self.threshold
            saliency[tuple(selector)] = values / peak
            found = bool(np.any(values > self.threshold))
            (result.found_slices if found else result.not_found_slices).append(index)
            result.processed_slices.append(index)
            if progress is not None:
                progress(done + 1, stop - start, f"Slice {index}")
        return result


@pytest.fixture
def threshold_segmenter() -> ThresholdSegmenter:
    return ThresholdSegmenter()


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_clip_id, tiny_sam_checkpoint):
    """The real ZeroShotSegmenter on the tiny BiomedCLIP and SAM models (random weights), with a small top-k."""
    from MedCLIPSAMLib.models import load_clip, load_sam
    from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter

    clip = load_clip(tiny_clip_id, device="cpu")
    sam_model = load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu", download=False)
    return ZeroShotSegmenter(clip, sam_model, ZeroShotConfig(top_k=4, batch_size=4))

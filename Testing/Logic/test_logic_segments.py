"""Segment bookkeeping of the Logic: other segments untouched, re-runs replace in place, cancel keeps the scene sane."""

from __future__ import annotations

import numpy as np
import pytest
from vtk.util import numpy_support

import slicer
from MedCLIPSAMModule import mrml
from MedCLIPSAMModule.logic import PARTIAL_DISCARD, PARTIAL_KEEP, MedCLIPSAMLogic

IJK_TO_RAS = np.array(
    [[0.0, 0.0, 2.0, -5.0], [0.9, 0.0, 0.0, 10.0], [0.0, 0.7, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]]
)  # sagittally stored grid with anisotropic spacing


def _volume() -> np.ndarray:
    volume = np.zeros((8, 16, 18), dtype=np.int16)
    volume[2:6, 4:10, 3:12] = 100
    volume[3, 11:14, 14:17] = 60
    return volume


def _segment_snapshot(segmentation_node, segment_id, reference_node) -> dict:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap
    )
    binary = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).copy()
    return {
        "name": segment.GetName(),
        "color": tuple(segment.GetColor()),
        "tags": segment.GetTags() if hasattr(segment, "GetTags") else None,
        "extent": tuple(labelmap.GetExtent()),
        "bytes": (binary > 0).astype(np.uint8).tobytes(),
        "mask": mrml.segmentMaskArray(segmentation_node, segment_id, reference_node),
    }


@pytest.fixture
def prepared(scene, threshold_segmenter):
    """Input volume, a segmentation with two user segments (one overlapping the target) and a Logic."""
    volume = _volume()
    input_node = mrml.addScalarVolumeFromArray(scene, volume, IJK_TO_RAS, "input")
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    overlapping = np.zeros(volume.shape, dtype=np.uint8)
    overlapping[3:5, 2:8, 2:6] = 1
    separate = np.zeros(volume.shape, dtype=np.uint8)
    separate[6:8, 12:15, 1:3] = 1
    user_ids = [
        mrml.writeSegmentFromMask(segmentation_node, overlapping, IJK_TO_RAS, "user overlapping"),
        mrml.writeSegmentFromMask(segmentation_node, separate, IJK_TO_RAS, "user separate"),
    ]
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)
    return input_node, segmentation_node, user_ids, logic, volume


def test_other_segments_unchanged(prepared):
    input_node, segmentation_node, user_ids, logic, _ = prepared
    before = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]

    logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node, axis="sagittal")

    after = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]
    for old, new in zip(before, after):
        assert new["name"] == old["name"]
        assert new["color"] == old["color"]
        assert new["tags"] == old["tags"]
        assert new["extent"] == old["extent"]
        assert new["bytes"] == old["bytes"]
        assert np.array_equal(new["mask"], old["mask"])


def test_new_segment_named_after_prompt(prepared):
    input_node, segmentation_node, _, logic, volume = prepared

    outcome = logic.segmentVolume(input_node, "  tumor ", segmentationNode=segmentation_node, axis="sagittal")

    assert outcome.segmentationNode is segmentation_node
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 3
    assert segmentation_node.GetSegmentation().GetSegment(outcome.segmentId).GetName() == "tumor"
    written = mrml.segmentMaskArray(segmentation_node, outcome.segmentId, input_node)
    assert np.array_equal(written, (volume > 0.5).astype(np.uint8))


def test_rerun_replaces_same_segment(prepared, threshold_segmenter):
    input_node, segmentation_node, user_ids, logic, volume = prepared
    first = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node, axis="sagittal")
    before = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]
    threshold_segmenter.threshold = 80  # the second run keeps only the brighter block

    second = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node, axis="sagittal")

    assert second.segmentId == first.segmentId
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 3
    written = mrml.segmentMaskArray(segmentation_node, second.segmentId, input_node)
    assert np.array_equal(written, (volume > 80).astype(np.uint8))
    after = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]
    for old, new in zip(before, after):
        assert new["bytes"] == old["bytes"]


def test_rerun_reuses_saliency_node(prepared):
    input_node, segmentation_node, _, logic, _ = prepared
    first = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)
    volume_count = logic.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")

    second = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)

    assert second.saliencyNode is first.saliencyNode
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volume_count


def test_new_segmentation_created_when_none(prepared):
    input_node, _, _, logic, _ = prepared
    count = logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    outcome = logic.segmentVolume(input_node, "tumor")

    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count + 1
    assert outcome.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1


class _CancelAfter:
    """Cancel callback that returns True from its (calls + 1)-th poll on."""

    def __init__(self, calls: int) -> None:
        self.remaining = calls

    def __call__(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def test_cancel_keep_writes_named_partial(prepared):
    input_node, segmentation_node, user_ids, logic, volume = prepared
    first = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node, axis="sagittal")
    complete_mask = mrml.segmentMaskArray(segmentation_node, first.segmentId, input_node)

    outcome = logic.segmentVolume(
        input_node, "tumor", segmentationNode=segmentation_node, axis="sagittal",
        partialPolicy=PARTIAL_KEEP, cancel=_CancelAfter(4),
    )

    assert outcome.cancelled
    assert outcome.processedSlices == [0, 1, 2, 3]
    assert outcome.segmentName == "tumor (partial, slices 0-3)"
    assert outcome.segmentId != first.segmentId
    partial = mrml.segmentMaskArray(segmentation_node, outcome.segmentId, input_node)
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[:4] = volume[:4] > 0.5
    assert np.array_equal(partial, expected)
    # The complete result of the earlier run is still there, unchanged.
    assert np.array_equal(mrml.segmentMaskArray(segmentation_node, first.segmentId, input_node), complete_mask)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == len(user_ids) + 2


def test_cancel_discard_leaves_scene_unchanged(prepared):
    input_node, segmentation_node, user_ids, logic, _ = prepared
    before_ids = _node_ids(logic.scene)
    before = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]

    outcome = logic.segmentVolume(
        input_node, "tumor", segmentationNode=segmentation_node, partialPolicy=PARTIAL_DISCARD,
        cancel=_CancelAfter(3),
    )

    assert outcome.cancelled
    assert not outcome.written
    assert outcome.processedSlices == [0, 1, 2]
    assert _node_ids(logic.scene) == before_ids
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == len(user_ids)
    after = [_segment_snapshot(segmentation_node, segment_id, input_node) for segment_id in user_ids]
    for old, new in zip(before, after):
        assert new["bytes"] == old["bytes"]


def test_cancel_discard_without_output_adds_no_node(prepared):
    input_node, _, _, logic, _ = prepared
    before_ids = _node_ids(logic.scene)

    outcome = logic.segmentVolume(input_node, "tumor", partialPolicy=PARTIAL_DISCARD, cancel=_CancelAfter(2))

    assert outcome.segmentationNode is None
    assert outcome.saliencyNode is None
    assert _node_ids(logic.scene) == before_ids


def test_cancel_before_first_slice_writes_nothing(prepared):
    input_node, segmentation_node, user_ids, logic, _ = prepared

    outcome = logic.segmentVolume(
        input_node, "tumor", segmentationNode=segmentation_node, partialPolicy=PARTIAL_KEEP, cancel=lambda: True
    )

    assert not outcome.written
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == len(user_ids)


def test_empty_result_gives_empty_segment(prepared, threshold_segmenter):
    input_node, segmentation_node, user_ids, logic, volume = prepared
    threshold_segmenter.threshold = 10_000  # above every voxel: nothing found

    outcome = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)

    assert outcome.foundSlices == []
    written = mrml.segmentMaskArray(segmentation_node, outcome.segmentId, input_node)
    assert not written.any()


def test_replaced_segment_keeps_position_and_color(prepared, threshold_segmenter):
    input_node, segmentation_node, user_ids, logic, _ = prepared
    first = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    segmentation.GetSegment(first.segmentId).SetColor(0.1, 0.2, 0.3)
    index = segmentation.GetSegmentIndex(first.segmentId)

    second = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)

    assert segmentation.GetSegmentIndex(second.segmentId) == index
    assert segmentation.GetSegment(second.segmentId).GetColor() == pytest.approx((0.1, 0.2, 0.3))


def test_rerun_on_shared_layer_keeps_neighbour(scene, threshold_segmenter):
    volume = _volume()
    input_node = mrml.addScalarVolumeFromArray(scene, volume, IJK_TO_RAS, "input")
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "shared")
    segmentation_node.CreateDefaultDisplayNodes()
    neighbour = np.zeros(volume.shape, dtype=np.uint8)
    neighbour[0:2, 0:4, 0:4] = 1
    old_tumor = np.zeros(volume.shape, dtype=np.uint8)
    old_tumor[6:8, 10:14, 10:14] = 1
    neighbour_id = mrml.writeSegmentFromMask(segmentation_node, neighbour, IJK_TO_RAS, "neighbour")
    tumor_id = mrml.writeSegmentFromMask(segmentation_node, old_tumor, IJK_TO_RAS, "tumor")
    segmentation = segmentation_node.GetSegmentation()
    segmentation.CollapseBinaryLabelmaps(False)
    assert segmentation.GetNumberOfLayers() == 1
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "tumor", segmentationNode=segmentation_node)

    assert outcome.segmentId == tumor_id
    assert np.array_equal(mrml.segmentMaskArray(segmentation_node, neighbour_id, input_node), neighbour)
    written = mrml.segmentMaskArray(segmentation_node, tumor_id, input_node)
    assert np.array_equal(written, (volume > 0.5).astype(np.uint8))

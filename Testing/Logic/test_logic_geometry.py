"""Logic geometry on a real MRML scene: axis mapping and the array -> node -> array round trip.

The deterministic ThresholdSegmenter (conftest) makes the expected mask of every voxel known, so a wrong axis, a
flipped or transposed array, or a lost IJK-to-RAS matrix fails voxel for voxel.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMModule import mrml
from MedCLIPSAMModule.logic import MedCLIPSAMLogic


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    cosine, sine = np.cos(angle), np.sin(angle)
    first, second = [index for index in range(3) if index != axis]
    rotation = np.eye(3)
    rotation[first, first] = cosine
    rotation[first, second] = -sine
    rotation[second, first] = sine
    rotation[second, second] = cosine
    return rotation


def _ijk_to_ras(directions: np.ndarray, spacing=(0.8, 1.1, 2.5), origin=(-12.0, 30.5, 7.25)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=float) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def _structured_volume(shape=(6, 20, 24), seed=0) -> np.ndarray:
    """int16 [K, J, I] volume: low noise plus one bright, asymmetric block, so any flip changes the mask."""
    generator = np.random.default_rng(seed)
    volume = generator.integers(0, 40, size=shape).astype(np.int16)
    volume[1:4, 3:9, 5:17] = 200
    volume[2, 12:15, 2:4] = 150
    return volume


# Axial storage: I -> R, J -> A, K -> S.
AXIAL = np.eye(3)
# Sagittal storage: I -> A, J -> S, K -> R (slices are sagittal planes).
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# Coronal storage with flips: I -> -R (left), J -> -S, K -> A.
CORONAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# Axial tilted by 25 degrees about R, then 15 degrees about S.
OBLIQUE = _rotation(2, 15.0) @ _rotation(0, 25.0)

CASES = [
    # (name, directions, requested plane, expected array axis)
    ("axial-axial", AXIAL, "axial", 0),
    ("axial-coronal", AXIAL, "coronal", 1),
    ("axial-sagittal", AXIAL, "sagittal", 2),
    ("sagittal-sagittal", SAGITTAL, "sagittal", 0),
    ("sagittal-axial", SAGITTAL, "axial", 1),
    ("sagittal-coronal", SAGITTAL, "coronal", 2),
    ("coronal-coronal", CORONAL, "coronal", 0),
    ("coronal-axial", CORONAL, "axial", 1),
    ("oblique-axial", OBLIQUE, "axial", 0),
    ("oblique-sagittal", OBLIQUE, "sagittal", 2),
]


@pytest.mark.parametrize(("name", "directions", "plane", "expected_axis"), CASES, ids=[case[0] for case in CASES])
def test_mask_lands_on_input_voxels(scene, threshold_segmenter, name, directions, plane, expected_axis):
    volume = _structured_volume()
    ijk_to_ras = _ijk_to_ras(directions)
    input_node = mrml.addScalarVolumeFromArray(scene, volume, ijk_to_ras, f"input {name}")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "tumor", axis=plane, sliceRange=(1, 3), showSaliency=False)

    assert outcome.sliceAxis == expected_axis
    assert threshold_segmenter.calls[-1]["axis"] == expected_axis
    expected = np.zeros(volume.shape, dtype=np.uint8)
    selector = [slice(None)] * 3
    selector[expected_axis] = slice(1, 3)
    expected[tuple(selector)] = volume[tuple(selector)] > threshold_segmenter.threshold
    written = mrml.segmentMaskArray(outcome.segmentationNode, outcome.segmentId, input_node)
    assert np.array_equal(written, expected)


def test_saliency_node_has_input_geometry(scene, threshold_segmenter):
    volume = _structured_volume()
    ijk_to_ras = _ijk_to_ras(OBLIQUE)
    input_node = mrml.addScalarVolumeFromArray(scene, volume, ijk_to_ras, "input")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "tumor", axis="axial", showSaliency=True)

    saliency_node = outcome.saliencyNode
    assert np.allclose(mrml.ijkToRasArray(saliency_node), ijk_to_ras)
    assert np.allclose(saliency_node.GetOrigin(), input_node.GetOrigin())
    assert np.allclose(saliency_node.GetSpacing(), input_node.GetSpacing())
    saliency = mrml.arrayFromVolumeNode(saliency_node)
    assert saliency.dtype == np.float32
    assert np.allclose(saliency, volume / volume.max())


def test_saliency_display_uses_heat_table(scene, threshold_segmenter):
    volume = _structured_volume()
    input_node = mrml.addScalarVolumeFromArray(scene, volume, _ijk_to_ras(AXIAL), "input")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "tumor")

    display_node = outcome.saliencyNode.GetDisplayNode()
    assert display_node.GetColorNode().GetName() in ("Inferno", "ColdToHotRainbow", mrml.HEAT_COLOR_TABLE_NAME)
    assert display_node.GetWindowLevelMin() == pytest.approx(0.0)
    assert display_node.GetWindowLevelMax() == pytest.approx(1.0)


def test_reference_geometry_is_input(scene, threshold_segmenter):
    volume = _structured_volume()
    input_node = mrml.addScalarVolumeFromArray(scene, volume, _ijk_to_ras(SAGITTAL), "input")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "tumor", axis="sagittal")

    reference = outcome.segmentationNode.GetSegmentation().GetConversionParameter("Reference image geometry")
    values = [float(value) for value in reference.split(";") if value]
    matrix = np.array(values[:16]).reshape(4, 4)
    assert np.allclose(matrix, _ijk_to_ras(SAGITTAL))
    assert values[16:] == [0, volume.shape[2] - 1, 0, volume.shape[1] - 1, 0, volume.shape[0] - 1]


@pytest.mark.parametrize(
    ("shape", "directions", "expected_axis"),
    [
        ((1, 24, 20), AXIAL, 0),  # X-ray as one axial slice
        ((24, 1, 20), AXIAL, 1),  # one coronal slice of an axially stored grid
        ((1, 24, 20), CORONAL, 0),  # ultrasound frame whose slice normal points anterior
    ],
)
def test_single_slice_volume_uses_its_plane(scene, threshold_segmenter, shape, directions, expected_axis):
    volume = np.zeros(shape, dtype=np.uint8)
    selector = [slice(4, 12)] * 3
    selector[expected_axis] = slice(None)
    volume[tuple(selector)] = 255
    input_node = mrml.addScalarVolumeFromArray(scene, volume, _ijk_to_ras(directions), "image")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    outcome = logic.segmentVolume(input_node, "lesion", axis="sagittal")

    assert outcome.sliceAxis == expected_axis
    written = mrml.segmentMaskArray(outcome.segmentationNode, outcome.segmentId, input_node)
    assert np.array_equal(written, (volume > 0).astype(np.uint8))


def test_progress_reported_per_slice(scene, threshold_segmenter):
    volume = _structured_volume()
    input_node = mrml.addScalarVolumeFromArray(scene, volume, _ijk_to_ras(AXIAL), "input")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)
    reports = []

    logic.segmentVolume(input_node, "tumor", progress=lambda done, total, message: reports.append((done, total)))

    assert reports == [(done, volume.shape[0]) for done in range(1, volume.shape[0] + 1)]


def _vector_volume(scene, values: np.ndarray):
    """Add a vector volume node with `values` of shape [K, J, I, C]."""
    from vtk.util import numpy_support
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    image = vtk.vtkImageData()
    slices, rows, columns, components = values.shape
    image.SetDimensions(columns, rows, slices)
    scalars = numpy_support.numpy_to_vtk(values.reshape(-1, components), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    return node


def test_rgb_volume_becomes_grey(scene):
    values = np.zeros((1, 4, 5, 3), dtype=np.uint8)
    values[0, 1, 2] = (30, 60, 91)

    grey = mrml.arrayFromVolumeNode(_vector_volume(scene, values))

    assert grey.shape == (1, 4, 5)
    assert grey.dtype == np.uint8
    assert grey[0, 1, 2] == 60


def test_two_component_volume_rejected(scene, threshold_segmenter):
    node = _vector_volume(scene, np.zeros((2, 4, 5, 2), dtype=np.uint8))
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    with pytest.raises(InvalidInputError, match="2 components"):
        logic.segmentVolume(node, "tumor")


def test_non_volume_node_rejected(scene, threshold_segmenter):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "not a volume")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    with pytest.raises(InvalidInputError, match="scalar volume"):
        logic.segmentVolume(node, "tumor")


def test_empty_prompt_rejected(scene, threshold_segmenter):
    input_node = mrml.addScalarVolumeFromArray(scene, _structured_volume(), _ijk_to_ras(AXIAL), "input")
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(threshold_segmenter)

    with pytest.raises(InvalidInputError, match="prompt"):
        logic.segmentVolume(input_node, "   ")


def test_extent_in_same_geometry_is_unchanged():
    ijk_to_ras = _ijk_to_ras(OBLIQUE)
    labelmap = mrml.orientedImageFromMask(np.zeros((6, 20, 24), dtype=np.uint8), ijk_to_ras)

    extent = mrml.extentInLabelmap([0, 23, 0, 19, 3, 3], ijk_to_ras, labelmap)

    assert extent == [0, 23, 0, 19, 3, 3]


def test_extent_in_oversampled_labelmap():
    ijk_to_ras = _ijk_to_ras(AXIAL, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    fine = ijk_to_ras.copy()
    fine[:3, :3] = ijk_to_ras[:3, :3] / 2.0  # half the voxel size along every axis
    fine[:3, 3] = ijk_to_ras[:3, :3] @ np.array([-0.25, -0.25, -0.25])  # voxel boxes aligned with the source grid
    labelmap = mrml.orientedImageFromMask(np.zeros((12, 40, 48), dtype=np.uint8), fine)

    extent = mrml.extentInLabelmap([0, 23, 0, 19, 3, 3], ijk_to_ras, labelmap)

    assert extent == [0, 47, 0, 39, 6, 7]

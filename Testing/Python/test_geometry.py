"""MedCLIPSAMLib.geometry: slicing axis from the IJK-to-RAS matrix and RAS/LPS conversion against SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.geometry import (
    anatomical_axis_of_array_axis,
    array_axis_closest_to,
    ijk_to_ras_from_itk,
    itk_geometry_from_ijk_to_ras,
    slice_axis_for,
)


def _matrix(columns, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(columns, dtype=float).T @ np.diag(spacing)
    return matrix


# Columns given as the RAS directions of I, J, K.
AXIAL = _matrix([(1, 0, 0), (0, 1, 0), (0, 0, 1)], spacing=(0.7, 0.7, 5.0))
SAGITTAL = _matrix([(0, 1, 0), (0, 0, -1), (1, 0, 0)])  # I -> A, J -> I(nferior), K -> R
CORONAL = _matrix([(-1, 0, 0), (0, 0, 1), (0, 1, 0)])  # I -> L, J -> S, K -> A


@pytest.mark.parametrize(
    ("matrix", "plane", "expected"),
    [
        (AXIAL, "axial", 0), (AXIAL, "coronal", 1), (AXIAL, "sagittal", 2),
        (SAGITTAL, "sagittal", 0), (SAGITTAL, "axial", 1), (SAGITTAL, "coronal", 2),
        (CORONAL, "coronal", 0), (CORONAL, "axial", 1), (CORONAL, "sagittal", 2),
    ],
)
def test_slice_axis_for_permuted_directions(matrix, plane, expected):
    assert slice_axis_for(matrix, plane) == expected


def test_slice_axis_for_oblique_volume():
    angle = np.deg2rad(35.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    matrix = np.eye(4)
    matrix[:3, :3] = tilt  # axial grid tilted 35 degrees about R: K is still closest to S

    assert slice_axis_for(matrix, "axial") == 0
    assert slice_axis_for(matrix, "coronal") == 1
    assert slice_axis_for(matrix, "sagittal") == 2


def test_slice_axis_for_oblique_past_45_degrees():
    angle = np.deg2rad(60.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    matrix = np.eye(4)
    matrix[:3, :3] = tilt  # now J is closer to S than K is

    assert slice_axis_for(matrix, "axial") == 1


@pytest.mark.parametrize(("shape", "expected"), [((1, 64, 80), 0), ((64, 1, 80), 1), ((64, 80, 1), 2)])
def test_single_slice_volume_uses_its_own_plane(shape, expected):
    assert slice_axis_for(AXIAL, "sagittal", shape) == expected


def test_spacing_does_not_change_axis():
    scaled = AXIAL.copy()
    scaled[:3, :3] = scaled[:3, :3] @ np.diag([10.0, 0.1, 3.0])

    assert slice_axis_for(scaled, "coronal") == 1


def test_array_axis_closest_to_ignores_sign():
    assert array_axis_closest_to(CORONAL, (0.0, -2.0, 0.1)) == 0


def test_anatomical_axis_of_array_axis():
    assert anatomical_axis_of_array_axis(SAGITTAL, 0) == "sagittal"
    assert anatomical_axis_of_array_axis(SAGITTAL, 1) == "axial"
    assert anatomical_axis_of_array_axis(SAGITTAL, 2) == "coronal"


@pytest.mark.parametrize(
    ("matrix", "plane"), [(np.zeros((4, 4)), "axial"), (np.eye(3)[:2], "axial"), (AXIAL, "transverse")]
)
def test_invalid_inputs_rejected(matrix, plane):
    with pytest.raises(InvalidInputError):
        slice_axis_for(matrix, plane)


def test_itk_round_trip_matches_simpleitk():
    image = sitk.Image(5, 6, 7, sitk.sitkUInt8)
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetSpacing((0.5, 0.75, 2.0))
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(direction.reshape(-1).tolist())

    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())

    # Voxel (i, j, k) = (2, 3, 4): SimpleITK's LPS point, flipped to RAS, must equal the matrix product.
    lps = np.array(image.TransformIndexToPhysicalPoint((2, 3, 4)))
    ras = matrix @ np.array([2, 3, 4, 1.0])
    assert np.allclose(ras[:3], lps * np.array([-1, -1, 1]))
    origin, spacing, direction_back = itk_geometry_from_ijk_to_ras(matrix)
    assert np.allclose(origin, image.GetOrigin())
    assert np.allclose(spacing, image.GetSpacing())
    assert np.allclose(direction_back, image.GetDirection())

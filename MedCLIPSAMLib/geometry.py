"""Voxel-to-patient geometry of volumes: slicing axes and RAS/LPS conversion (numpy only).

Conventions:

* A volume array is indexed ``[K, J, I]`` (slice, row, column), the order that ``slicer.util.arrayFromVolume``
  and ``SimpleITK.GetArrayFromImage`` return. Array axis 0 is K, axis 1 is J and axis 2 is I.
* ``ijk_to_ras`` is the 4x4 homogeneous matrix of a Slicer volume node (``GetIJKToRASMatrix``): column c of its
  upper 3x3 block is the RAS step in millimetres for one voxel along index c (c = 0 for I, 1 for J, 2 for K).
* ITK images (SimpleITK, NRRD and NIfTI files as ITK reads them) use LPS patient coordinates: origin and direction
  are in LPS, and the direction matrix has unit columns ordered I, J, K. RAS = diag(-1, -1, 1) * LPS.
"""

from __future__ import annotations

import logging

import numpy as np

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = [
    "ANATOMICAL_AXES",
    "anatomical_axis_of_array_axis",
    "array_axis_closest_to",
    "ijk_to_ras_from_itk",
    "itk_geometry_from_ijk_to_ras",
    "slice_axis_for",
]

logger = logging.getLogger(__name__)

ANATOMICAL_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Anatomical slicing planes and the RAS component (0 R, 1 A, 2 S) of each plane's normal."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Volume axis order of a [K, J, I] array: array axis a is IJK index 2 - a.
_ARRAY_AXIS_TO_IJK_INDEX = (2, 1, 0)

# Smallest accepted voxel step length in millimetres; a shorter column means a singular matrix.
_MIN_STEP_MM = 1e-9


def _direction_columns(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Return the 3x3 block of an IJK-to-RAS matrix with unit-length columns (I, J, K directions in RAS)."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape not in ((4, 4), (3, 3)):
        raise InvalidInputError(
            f"IJK-to-RAS matrix must be 4x4 (or its 3x3 direction block), got shape {matrix.shape}."
        )
    block = matrix[:3, :3]
    if not np.all(np.isfinite(block)):
        raise InvalidInputError(f"IJK-to-RAS matrix contains NaN or infinite values: {block.tolist()}.")
    lengths = np.linalg.norm(block, axis=0)
    if np.any(lengths < _MIN_STEP_MM):
        raise InvalidInputError(
            f"IJK-to-RAS matrix has a zero-length voxel step (column lengths {lengths.tolist()} mm); "
            "fix the volume's spacing."
        )
    return block / lengths


def _single_slice_axis(shape: tuple[int, ...] | None) -> int | None:
    """Return the array axis of size 1 when `shape` is a 2D image stored as a volume with one slice."""
    if shape is None:
        return None
    if len(shape) != 3:
        raise InvalidInputError(f"Volume shape must have 3 axes [K, J, I], got {tuple(shape)}.")
    singleton = [axis for axis, size in enumerate(shape) if size == 1]
    if len(singleton) == 1:
        return singleton[0]
    return None


def slice_axis_for(
    ijk_to_ras: np.ndarray, anatomical_axis: str = "axial", shape: tuple[int, int, int] | None = None
) -> int:
    """Find the array axis to step along to get slices in an anatomical plane.

    The result is the array axis whose voxel direction is most nearly parallel (largest absolute cosine) to the
    plane's normal (R for sagittal, A for coronal, S for axial). So oblique volumes and volumes stored in coronal,
    sagittal or permuted order get the plane closest to the requested one. Ties (exactly 45 degrees) go to the
    lower array axis.

    A 2D image stored as a volume with one slice (exactly one axis of size 1 in `shape`) is always sliced along
    that axis, whatever `anatomical_axis` requests, because any other axis would give one-voxel-wide lines.

    Args:
        ijk_to_ras: 4x4 IJK-to-RAS matrix (or its 3x3 block); only directions matter, spacing is ignored.
        anatomical_axis: "axial", "coronal" or "sagittal".
        shape: Array shape ``(K, J, I)``; needed only to recognise single-slice volumes.

    Returns:
        Array axis 0 (K), 1 (J) or 2 (I) of a ``[K, J, I]`` array.
    """
    if anatomical_axis not in ANATOMICAL_AXES:
        raise InvalidInputError(
            f"Unknown anatomical axis {anatomical_axis!r}; expected one of {sorted(ANATOMICAL_AXES)}."
        )
    directions = _direction_columns(ijk_to_ras)
    single = _single_slice_axis(shape)
    if single is not None:
        return single

    normal = np.zeros(3)
    normal[ANATOMICAL_AXES[anatomical_axis]] = 1.0
    return array_axis_closest_to(directions, normal)


def array_axis_closest_to(ijk_to_ras: np.ndarray, ras_direction) -> int:
    """Return the array axis (0 K, 1 J, 2 I) whose voxel direction is most nearly parallel to `ras_direction`.

    Args:
        ijk_to_ras: 4x4 IJK-to-RAS matrix or its 3x3 block.
        ras_direction: 3-vector in RAS, any non-zero length (e.g. a slice view's normal). Its sign is ignored.
    """
    directions = _direction_columns(ijk_to_ras)
    direction = np.asarray(ras_direction, dtype=np.float64).reshape(-1)
    length = np.linalg.norm(direction) if direction.size == 3 else 0.0
    if not np.isfinite(length) or length < _MIN_STEP_MM:
        raise InvalidInputError(f"Direction must be a finite, non-zero 3-vector, got {np.asarray(ras_direction).tolist()}.")
    cosines = [abs(float(directions[:, _ARRAY_AXIS_TO_IJK_INDEX[axis]] @ direction)) / length for axis in range(3)]
    return int(np.argmax(cosines))


def anatomical_axis_of_array_axis(ijk_to_ras: np.ndarray, array_axis: int) -> str:
    """Name the anatomical plane ("axial", "coronal", "sagittal") closest to the slices across `array_axis`."""
    if array_axis not in (0, 1, 2):
        raise InvalidInputError(f"Array axis must be 0, 1 or 2 of a [K, J, I] array, got {array_axis!r}.")
    direction = _direction_columns(ijk_to_ras)[:, _ARRAY_AXIS_TO_IJK_INDEX[array_axis]]
    ras_component = int(np.argmax(np.abs(direction)))
    return {component: name for name, component in ANATOMICAL_AXES.items()}[ras_component]


def ijk_to_ras_from_itk(origin, spacing, direction) -> np.ndarray:
    """Build the 4x4 IJK-to-RAS matrix of an ITK image from its LPS origin, spacing and direction.

    Args:
        origin: 3 LPS coordinates in millimetres of the centre of voxel (0, 0, 0).
        spacing: 3 voxel sizes in millimetres along I, J, K.
        direction: 9 values (row-major, as ``SimpleITK.Image.GetDirection`` returns) or a 3x3 matrix whose
            columns are the I, J, K directions in LPS.

    Returns:
        float64 array of shape (4, 4).
    """
    origin = np.asarray(origin, dtype=np.float64).reshape(-1)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    direction = np.asarray(direction, dtype=np.float64)
    if origin.size != 3 or spacing.size != 3 or direction.size != 9:
        raise InvalidInputError(
            f"3D geometry expected: origin {origin.size} values, spacing {spacing.size}, direction "
            f"{direction.size} (need 3, 3, 9). Reduce a 2D image to a volume with one slice first."
        )
    if np.any(spacing <= 0):
        raise InvalidInputError(f"Spacing must be positive in millimetres, got {spacing.tolist()}.")
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_TO_RAS @ direction.reshape(3, 3) @ np.diag(spacing)
    matrix[:3, 3] = _LPS_TO_RAS @ origin
    return matrix


def itk_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Split a 4x4 IJK-to-RAS matrix into the LPS origin, spacing and row-major direction ITK expects."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InvalidInputError(f"IJK-to-RAS matrix must be 4x4, got shape {matrix.shape}.")
    block = matrix[:3, :3]
    spacing = np.linalg.norm(block, axis=0)
    if np.any(spacing < _MIN_STEP_MM):
        raise InvalidInputError(f"IJK-to-RAS matrix has a zero-length voxel step: {spacing.tolist()} mm.")
    direction_lps = _LPS_TO_RAS @ (block / spacing)
    origin_lps = _LPS_TO_RAS @ matrix[:3, 3]
    return tuple(origin_lps.tolist()), tuple(spacing.tolist()), tuple(direction_lps.reshape(-1).tolist())

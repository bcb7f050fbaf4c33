"""Conversion between MRML nodes and numpy arrays, plus the segment and colour-table bookkeeping.

Arrays are indexed ``[K, J, I]`` like ``slicer.util.arrayFromVolume``. Geometry always travels as the volume's
4x4 IJK-to-RAS matrix, so oblique and non-axial volumes keep their orientation through every round trip.
These helpers use only MRML and VTK (no slicer.app, no Qt) so that they work on a bare MRML scene.
"""

from __future__ import annotations

import logging

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from MedCLIPSAMLib.cli.volume import SEGMENT_COLORS  # the CLI's .seg.nrrd files use the same colours
from MedCLIPSAMLib.errors import InvalidInputError

logger = logging.getLogger(__name__)

HEAT_COLOR_TABLE_NAME = "MedCLIPSAM heat"
"""Name of the colour table the module creates when the scene has no Inferno table."""

# Slicer ships an "Inferno" table (perceptually uniform, black-red-yellow); the slicer-core wheel has no colour files.
_PREFERRED_HEAT_TABLE_NAMES = ("Inferno", "ColdToHotRainbow")

# Inferno-like ramp: (position in [0, 1], red, green, blue), linearly interpolated over 256 entries.
_HEAT_RAMP = (
    (0.00, 0.00, 0.00, 0.02),
    (0.25, 0.34, 0.06, 0.43),
    (0.50, 0.73, 0.21, 0.33),
    (0.75, 0.98, 0.55, 0.04),
    (1.00, 0.99, 1.00, 0.64),
)
_HEAT_TABLE_SIZE = 256

# Voxel centres this close to a region border (in voxels) still count as inside.
_EXTENT_TOLERANCE_VOXELS = 1e-6


def ijkToRasArray(volumeNode) -> np.ndarray:
    """Return the volume's IJK-to-RAS matrix as a float64 array of shape (4, 4)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return arrayFromVtkMatrix(matrix)


def arrayFromVtkMatrix(matrix) -> np.ndarray:
    """Return a vtkMatrix4x4 as a float64 array of shape (4, 4)."""
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """Build a vtkMatrix4x4 from a (4, 4) array."""
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def arrayFromVolumeNode(volumeNode) -> np.ndarray:
    """Copy the voxels of a scalar volume node into a ``[K, J, I]`` array of the stored dtype.

    An 8-bit RGB or RGBA vector volume (a PNG or JPEG photo, ultrasound or X-ray loaded into Slicer) is converted to
    grey as the mean of R, G and B (alpha dropped), rounded to uint8. The pipeline replicates grey to RGB, so a grey
    image stored as RGB gives the same result as the grey image.

    Raises:
        InvalidInputError: not a volume node, no image data, or a component count other than 1 (3 or 4 for uint8).
    """
    isVolume = volumeNode is not None and volumeNode.IsA("vtkMRMLScalarVolumeNode")
    # Diffusion volume classes derive from the scalar volume class in MRML (vector volumes do too).
    isDiffusion = isVolume and (
        volumeNode.IsA("vtkMRMLDiffusionTensorVolumeNode") or volumeNode.IsA("vtkMRMLDiffusionWeightedVolumeNode")
    )
    if not isVolume or isDiffusion:
        name = volumeNode.GetClassName() if volumeNode is not None else None
        raise InvalidInputError(f"Input must be a scalar volume node, got {name}. Select a grey-level volume.")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise InvalidInputError(f"Volume {volumeNode.GetName()!r} has no voxels; load its image data first.")
    components = imageData.GetNumberOfScalarComponents()
    columns, rows, slices = imageData.GetDimensions()
    flat = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    if components == 1:
        return flat.reshape(slices, rows, columns).copy()
    if components in (3, 4) and flat.dtype == np.uint8:
        colour = flat.reshape(slices, rows, columns, components)[..., :3].astype(np.float32)
        return np.rint(colour.mean(axis=-1)).astype(np.uint8)
    raise InvalidInputError(
        f"Volume {volumeNode.GetName()!r} has {components} components of type {flat.dtype} per voxel; convert it to "
        "a scalar (grey-level) volume, for example with the Vector to Scalar Volume module."
    )


def _imageDataFromArray(array: np.ndarray, imageData=None):
    """Fill (or create) a vtkImageData with the voxels of a ``[K, J, I]`` array; the data are copied."""
    if array.ndim != 3:
        raise InvalidInputError(f"Volume array must have shape [K, J, I], got {array.shape}.")
    contiguous = np.ascontiguousarray(array)
    if imageData is None:
        imageData = vtk.vtkImageData()
    slices, rows, columns = contiguous.shape
    imageData.SetDimensions(columns, rows, slices)
    imageData.SetOrigin(0.0, 0.0, 0.0)
    imageData.SetSpacing(1.0, 1.0, 1.0)
    scalars = numpy_support.numpy_to_vtk(contiguous.reshape(-1), deep=True)
    imageData.GetPointData().SetScalars(scalars)
    return imageData


def updateScalarVolumeFromArray(volumeNode, array: np.ndarray, ijkToRas: np.ndarray) -> None:
    """Replace the voxels and geometry of a scalar volume node with `array` ([K, J, I]) and `ijkToRas` (4x4)."""
    imageData = _imageDataFromArray(array)
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRas))
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.Modified()


def addScalarVolumeFromArray(scene, array: np.ndarray, ijkToRas: np.ndarray, name: str):
    """Add a new scalar volume node containing `array` ([K, J, I]) with geometry `ijkToRas`; returns the node."""
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateScalarVolumeFromArray(volumeNode, array, ijkToRas)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def orientedImageFromMask(mask: np.ndarray, ijkToRas: np.ndarray):
    """Wrap a ``[K, J, I]`` 0/1 mask as a uint8 vtkOrientedImageData in the geometry `ijkToRas`."""
    orientedImage = slicer.vtkOrientedImageData()
    _imageDataFromArray(np.asarray(mask, dtype=np.uint8), orientedImage)
    orientedImage.SetImageToWorldMatrix(vtkMatrixFromArray(ijkToRas))
    return orientedImage


def extentInLabelmap(sourceExtent: list[int], sourceIjkToRas: np.ndarray, labelmap) -> list[int]:
    """Map a voxel extent of a source grid to the extent of `labelmap`'s voxels whose centres lie in that region.

    Args:
        sourceExtent: [i0, i1, j0, j1, k0, k1] inclusive voxel indices of the source grid.
        sourceIjkToRas: 4x4 IJK-to-RAS matrix of the source grid.
        labelmap: vtkOrientedImageData; the result is clipped to its extent.

    Returns:
        [i0, i1, j0, j1, k0, k1] in the labelmap's voxel indices. For identical geometries it equals `sourceExtent`.
    """
    labelmapToWorld = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(labelmapToWorld)
    worldToLabelmap = np.linalg.inv(arrayFromVtkMatrix(labelmapToWorld))
    # Corners of the source region: voxel centres at the ends, widened by half a voxel.
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (sourceExtent[0] - 0.5, sourceExtent[1] + 0.5)
            for j in (sourceExtent[2] - 0.5, sourceExtent[3] + 0.5)
            for k in (sourceExtent[4] - 0.5, sourceExtent[5] + 0.5)
        ]
    )
    labelmapIjk = (worldToLabelmap @ np.asarray(sourceIjkToRas) @ corners.T)[:3]
    low = np.ceil(labelmapIjk.min(axis=1) - _EXTENT_TOLERANCE_VOXELS).astype(int)
    high = np.floor(labelmapIjk.max(axis=1) + _EXTENT_TOLERANCE_VOXELS).astype(int)
    bounds = labelmap.GetExtent()
    extent = []
    for axis in range(3):
        extent.append(int(max(low[axis], bounds[2 * axis])))
        extent.append(int(min(high[axis], bounds[2 * axis + 1])))
    return extent


def segmentMaskArray(segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
    """Read one segment as a uint8 0/1 ``[K, J, I]`` array on the voxel grid of `referenceVolumeNode`.

    A segment stored in a shared labelmap layer yields only its own label. Voxels outside the segment's stored
    extent are 0.
    """
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise InvalidInputError(f"Segment {segmentId!r} not found in {segmentationNode.GetName()!r}.")
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, labelmap
    ):
        raise InvalidInputError(f"Segment {segmentId!r} has no binary labelmap representation.")

    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(referenceVolumeNode.GetImageData().GetDimensions())
    reference.SetImageToWorldMatrix(vtkMatrixFromArray(ijkToRasArray(referenceVolumeNode)))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    )
    columns, rows, slices = reference.GetDimensions()
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((slices, rows, columns), dtype=np.uint8)
    values = numpy_support.vtk_to_numpy(scalars).reshape(slices, rows, columns)
    return (values > 0).astype(np.uint8)


def findSegmentIdByName(segmentationNode, name: str) -> str | None:
    """Return the id of the first segment named exactly `name`, or None."""
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        if segmentation.GetSegment(segmentId).GetName() == name:
            return segmentId
    return None


def _sourceRepresentationName(segmentation) -> str:
    # Slicer 5.4 renamed "master" representation to "source" representation.
    if hasattr(segmentation, "GetSourceRepresentationName"):
        return segmentation.GetSourceRepresentationName()
    return segmentation.GetMasterRepresentationName()


def writeSegmentFromMask(segmentationNode, mask: np.ndarray, ijkToRas: np.ndarray, segmentName: str) -> str:
    """Write a ``[K, J, I]`` 0/1 mask as the segment named `segmentName`, replacing a segment of that name.

    The segment gets a labelmap of its own (its own layer), so no other segment's labelmap is read or written.
    A replaced segment keeps its id, position in the list, colour and tags.

    Returns:
        The segment id.

    Raises:
        InvalidInputError: the segmentation stores closed surfaces (or another non-labelmap representation) as its
            source representation.
    """
    segmentation = segmentationNode.GetSegmentation()
    labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() > 0 and _sourceRepresentationName(segmentation) != labelmapName:
        raise InvalidInputError(
            f"Segmentation {segmentationNode.GetName()!r} stores {_sourceRepresentationName(segmentation)!r}; "
            "choose a segmentation whose source representation is a binary labelmap, or a new segmentation."
        )

    segment = slicer.vtkSegment()
    segmentId = findSegmentIdByName(segmentationNode, segmentName)
    insertBeforeId = ""
    if segmentId is not None:
        previous = segmentation.GetSegment(segmentId)
        segment.DeepCopyMetadata(previous)  # name, colour, tags
        index = segmentation.GetSegmentIndex(segmentId)
        if index + 1 < segmentation.GetNumberOfSegments():
            insertBeforeId = segmentation.GetNthSegmentID(index + 1)
        segmentation.RemoveSegment(segmentId)
    else:
        segmentId = ""
        segment.SetColor(*SEGMENT_COLORS[segmentation.GetNumberOfSegments() % len(SEGMENT_COLORS)])
    segment.SetName(segmentName)
    segment.AddRepresentation(labelmapName, orientedImageFromMask(mask, ijkToRas))
    if not segmentation.AddSegment(segment, segmentId, insertBeforeId):
        raise RuntimeError(f"Adding segment {segmentName!r} to {segmentationNode.GetName()!r} failed.")
    return segmentation.GetSegmentIdBySegment(segment)


def _heatTableValues() -> np.ndarray:
    """Return the (256, 3) RGB values in [0, 1] of the built-in heat ramp."""
    positions = np.linspace(0.0, 1.0, _HEAT_TABLE_SIZE)
    ramp = np.array(_HEAT_RAMP)
    return np.stack([np.interp(positions, ramp[:, 0], ramp[:, channel]) for channel in (1, 2, 3)], axis=1)


def heatColorNode(scene):
    """Return a heat colour table for saliency maps: Slicer's Inferno table, else one created once per scene."""
    for name in (*_PREFERRED_HEAT_TABLE_NAMES, HEAT_COLOR_TABLE_NAME):
        nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
        node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() > 0 else None
        if node is not None:
            return node

    colorNode = scene.CreateNodeByClass("vtkMRMLColorTableNode")
    colorNode.UnRegister(None)  # CreateNodeByClass returns a new reference that Python already owns
    colorNode.SetName(HEAT_COLOR_TABLE_NAME)
    colorNode.SetTypeToUser()
    colorNode.SetAttribute("Category", "MedCLIPSAM")
    colorNode.SetHideFromEditors(False)
    colorNode.SetNumberOfColors(_HEAT_TABLE_SIZE)
    colorNode.GetLookupTable().SetTableRange(0, _HEAT_TABLE_SIZE - 1)
    for index, (red, green, blue) in enumerate(_heatTableValues()):
        colorNode.SetColor(index, f"heat{index}", red, green, blue, 1.0)
    scene.AddNode(colorNode)
    return colorNode


def showVolumeAsHeatMap(volumeNode, minimum: float = 0.0, maximum: float = 1.0) -> None:
    """Give a volume's display node the heat colour table and a fixed window from `minimum` to `maximum`."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    displayNode = volumeNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID(heatColorNode(volumeNode.GetScene()).GetID())
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevelMinMax(minimum, maximum)

"""Reading 2D images, volumes and DICOM series, and writing masks.

Pillow reads PNG, JPEG, TIFF and BMP. SimpleITK reads single-frame DICOM, NRRD, NIfTI and MetaImage, while pydicom
reads DICOM headers and decodes the pixel data that SimpleITK rejects. DICOM series folders are grouped and ordered
here and then read with SimpleITK's ImageSeriesReader, so that series with empty UIDs also load.

Geometry dictionaries (`read_image_with_geometry`, `geometry_from_image`, `write_nrrd`) use ITK conventions:
LPS physical space in millimetres, axes in x, y, z order, ``direction`` as the row-major flattened matrix whose
columns are the axis directions.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import InvalidInputError

__all__ = [
    "dicom_metadata",
    "geometry_from_image",
    "list_dicom_series",
    "read_image",
    "read_image_with_geometry",
    "read_volume",
    "write_mask_png",
    "write_nrrd",
]

logger = logging.getLogger(__name__)

_ITK_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Modalities of DICOM objects that carry no scalar image to segment.
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
# Decimals kept when comparing ImageOrientationPatient values of the files of one series.
_ORIENTATION_DECIMALS = 4


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInputError(f"Image file not found: {path}.")
    if not path.is_file():
        raise InvalidInputError(f"{path} is a folder, not an image file; read DICOM series folders with read_volume.")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"Image file {path} is empty (0 bytes).")
    return path


def _is_dicom_file(path: Path) -> bool:
    """Return True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble) or a .dcm/.dicom/.ima name."""
    try:
        with open(path, "rb") as stream:
            header = stream.read(132)
    except OSError:
        return False
    return header[128:132] == b"DICM" or _suffix(path) in _DICOM_SUFFIXES


# --------------------------------------------------------------------------------------------------------------
# Geometry


def geometry_from_image(image: sitk.Image) -> dict[str, Any]:
    """Return the geometry dictionary of a SimpleITK image (keys as in `read_image_with_geometry`, ITK axis order)."""
    return {
        "spacing": tuple(float(value) for value in image.GetSpacing()),
        "origin": tuple(float(value) for value in image.GetOrigin()),
        "direction": tuple(float(value) for value in image.GetDirection()),
        "dimension": int(image.GetDimension()),
        "size": tuple(int(value) for value in image.GetSize()),
        "full_spacing": tuple(float(value) for value in image.GetSpacing()),
        "slice_axis": None,
    }


def _plain_geometry(width: int, height: int) -> dict[str, Any]:
    return {
        "size": (int(width), int(height)),
        "spacing": (1.0, 1.0),
        "origin": (0.0, 0.0),
        "direction": (1.0, 0.0, 0.0, 1.0),
        "dimension": 2,
        "full_spacing": (1.0, 1.0),
        "slice_axis": None,
    }


# --------------------------------------------------------------------------------------------------------------
# 2D images


def _pil_to_array(image) -> np.ndarray:
    """Convert a Pillow image to an array in its stored type (see `read_image` for the mode rules)."""
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in ("LA", "PA"):
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        image = image.convert("RGB")
    elif mode not in ("L", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
        raise ValueError(f"unsupported Pillow mode {mode}")

    array = np.array(image)
    if mode.startswith("I;16"):
        array = array.astype(np.uint16)
    elif mode == "I":
        array = array.astype(np.int32)
    elif mode == "F":
        array = array.astype(np.float32)
    return array


def _read_pil(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frames = int(getattr(image, "n_frames", 1))
            if frames > 1:
                raise InvalidInputError(
                    f"{path} contains {frames} frames; read_image needs a single 2D image. Split the pages, or convert "
                    "the stack to NRRD and segment it with `medclipsam segment-volume`."
                )
            image.load()
            array = _pil_to_array(image)
    except UnidentifiedImageError as error:
        raise InvalidInputError(
            f"Cannot read image {path}: the content is not a known image format ({error})."
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidInputError(f"Cannot read image {path}: the file is damaged or unsupported ({error}).") from error
    return array, _plain_geometry(array.shape[1], array.shape[0])


def _squeeze_itk_image(image: sitk.Image, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the 2D pixel array and geometry of a 2D image or a 3D image with one slice along some axis."""
    dimension = image.GetDimension()
    size = image.GetSize()
    geometry = geometry_from_image(image)
    if image.GetNumberOfPixels() == 0:
        raise InvalidInputError(f"Image {path} has no pixels (size {size}).")
    if image.GetNumberOfComponentsPerPixel() not in (1, 3, 4):
        raise InvalidInputError(
            f"Image {path} has {image.GetNumberOfComponentsPerPixel()} components per pixel; expected 1 (grey), "
            "3 (RGB) or 4 (RGBA)."
        )
    array = sitk.GetArrayFromImage(image)
    if dimension == 2:
        return array, geometry
    if dimension != 3:
        raise InvalidInputError(f"Image {path} has {dimension} dimensions; read_image reads 2D images.")

    single_axes = [axis for axis in (2, 1, 0) if size[axis] == 1]
    if not single_axes:
        raise InvalidInputError(
            f"{path} is a volume of size {size}; read_image needs a 2D image. Use read_volume or "
            "`medclipsam segment-volume`."
        )
    slice_axis = single_axes[0]
    kept = [axis for axis in range(3) if axis != slice_axis]
    # numpy axes are (z, y, x): ITK axis k is numpy axis 2 - k.
    array = np.squeeze(array, axis=2 - slice_axis)
    geometry["spacing"] = (geometry["full_spacing"][kept[0]], geometry["full_spacing"][kept[1]])
    geometry["slice_axis"] = slice_axis
    return array, geometry


def _read_itk_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise InvalidInputError(f"Failed to read {path} with SimpleITK: {reason}") from error


def _read_dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise InvalidInputError(f"Cannot read DICOM file {path}: {error}.") from error


def _invert_monochrome1(stored: np.ndarray, dataset) -> np.ndarray:
    """Invert stored MONOCHROME1 values over the BitsStored range, as ITK's GDCM reader does, so that higher
    values are brighter as in MONOCHROME2."""
    bits = int(dataset.get("BitsStored", stored.dtype.itemsize * 8))
    if int(dataset.get("PixelRepresentation", 0)) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    return (low + high - stored.astype(np.int64)).astype(stored.dtype)


def _read_dicom_pixels_with_pydicom(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Fallback reader for single-frame DICOM files that SimpleITK (GDCM) rejects."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(str(path))
        stored = dataset.pixel_array
        if str(dataset.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            stored = _invert_monochrome1(stored, dataset)
        array = apply_modality_lut(stored, dataset)
    except (OSError, ValueError, AttributeError, RuntimeError, NotImplementedError) as error:
        raise InvalidInputError(f"Cannot decode the pixel data of DICOM file {path}: {error}.") from error
    if np.issubdtype(array.dtype, np.floating):
        if np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)) and array.size:
            low, high = float(array.min()), float(array.max())
            array = array.astype(np.int16 if -32768 <= low and high <= 32767 else np.int32)
        else:
            array = array.astype(np.float32)

    geometry = _plain_geometry(array.shape[1], array.shape[0])
    spacing = [float(value) for value in dataset.get("PixelSpacing", [1.0, 1.0])]
    orientation = [float(value) for value in dataset.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    position = [float(value) for value in dataset.get("ImagePositionPatient", [0, 0, 0])]
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    geometry.update(
        {
            "spacing": (spacing[1], spacing[0]),
            "origin": tuple(position),
            "direction": tuple(float(value) for value in np.stack([row, column, normal], axis=1).ravel()),
            "dimension": 3,
            "size": (array.shape[1], array.shape[0], 1),
            "full_spacing": (spacing[1], spacing[0], 1.0),
            "slice_axis": 2,
        }
    )
    return array, geometry


def _read_dicom_image(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    header = _read_dicom_header(path)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InvalidInputError(
            f"{path} is a multi-frame DICOM file ({frames} frames); read_image needs one frame. Segment it as a "
            "volume with `medclipsam segment-volume`."
        )
    try:
        # GDCM applies RescaleSlope/RescaleIntercept and picks an output type that fits the rescaled values.
        image = sitk.ReadImage(str(path))
        array, geometry = _squeeze_itk_image(image, path)
        if array.dtype == np.float64:
            # GDCM returns float64 for a non-integer slope; float32 is precise enough for rescaled CT/MR values.
            array = array.astype(np.float32)
    except RuntimeError as error:
        logger.info("SimpleITK could not read %s (%s); decoding with pydicom", path, error)
        array, geometry = _read_dicom_pixels_with_pydicom(path)
    return array, geometry


def read_image_with_geometry(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2D image and its geometry.

    Returns:
        ``(array, geometry)``. The array is as `read_image` returns it. The geometry dictionary contains:

        * ``spacing``: (x, y) pixel spacing of the image plane in mm, 1.0 for PNG/JPEG/TIFF/BMP.
        * ``origin``, ``direction``, ``size``, ``full_spacing``: of the stored image, per stored axis.
        * ``dimension``: 2, or 3 for a one-slice volume or a DICOM slice.
        * ``slice_axis``: the ITK axis of size 1 that was removed, or None.

        `write_nrrd` accepts this dictionary and writes a 2D mask back with the same geometry.

    Raises:
        InvalidInputError: missing, empty, unreadable or unsupported file, naming the file and the reason.
    """
    path = _existing_file(path)
    if _suffix(path) in _ITK_SUFFIXES:
        array, geometry = _squeeze_itk_image(_read_itk_file(path), path)
    elif _is_dicom_file(path):
        array, geometry = _read_dicom_image(path)
    else:
        array, geometry = _read_pil(path)

    if array.size == 0:
        raise InvalidInputError(f"Image {path} has no pixels (shape {array.shape}).")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InvalidInputError(
            f"Image {path} has shape {array.shape}; expected H x W (grey) or H x W x 3/4 (RGB/RGBA)."
        )
    if np.iscomplexobj(array) or array.dtype == np.bool_:
        raise InvalidInputError(f"Image {path} has pixel type {array.dtype}, which cannot be shown as an image.")
    return np.ascontiguousarray(array), geometry


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as stored.

    Returns:
        ``H x W`` (grey) or ``H x W x C`` with C 3 (RGB) or 4 (RGBA), in the stored type. That is uint8 for
        8-bit files, uint16 for 16-bit PNG/TIFF, int32 for Pillow mode ``I`` and float32 for mode ``F``. DICOM
        values are after the rescale slope and intercept (an integer type when both are integers, else
        float32). MONOCHROME1 images are inverted over the BitsStored range before rescaling, as ITK does.
        Palette images become RGB (RGBA when they have transparency), 1-bit images uint8 0/255 and grey+alpha
        images RGBA. Alpha is kept.

    Raises:
        InvalidInputError: missing, empty, unreadable or unsupported file (multi-frame files and volumes with more
            than one slice included), naming the file and the reason.
    """
    return read_image_with_geometry(path)[0]


# --------------------------------------------------------------------------------------------------------------
# DICOM series


def _text(dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_.") or "unnamed"


def dicom_metadata(source) -> dict[str, str]:
    """Return the identifying fields of a DICOM file or pydicom Dataset, with fallbacks for blank values.

    Keys: PatientID, PatientName, StudyDate, StudyInstanceUID, StudyDescription, SeriesDescription, SeriesNumber,
    SeriesInstanceUID and Modality, each the stored text or "" when blank. ``name`` is a file-name-safe label
    ``<patient>_<study>_<series>``. Blank fields fall back: patient to the name or "anonymous", study date to
    the end of the study UID or "nodate", series description to the number, the UID or the modality.
    """
    if isinstance(source, (str, Path)):
        dataset = _read_dicom_header(Path(source))
    else:
        dataset = source
    keys = (
        "PatientID", "PatientName", "StudyDate", "StudyInstanceUID", "StudyDescription",
        "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "Modality",
    )
    metadata = {key: _text(dataset, key) for key in keys}
    patient = metadata["PatientID"] or metadata["PatientName"] or "anonymous"
    study = metadata["StudyDate"] or metadata["StudyInstanceUID"][-12:] or "nodate"
    series = (
        metadata["SeriesDescription"]
        or (f"series{metadata['SeriesNumber']}" if metadata["SeriesNumber"] else "")
        or metadata["SeriesInstanceUID"][-12:]
        or metadata["Modality"]
        or "series"
    )
    metadata["name"] = "_".join(_safe_name(part) for part in (patient, study, series))
    return metadata


def _slice_position(dataset) -> float | None:
    try:
        orientation = np.array([float(value) for value in dataset.ImageOrientationPatient])
        position = np.array([float(value) for value in dataset.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def _series_group(dataset) -> tuple[str, tuple]:
    """Return (series identity, sub-group of files that form one regular grid) for a header."""
    uid = _text(dataset, "SeriesInstanceUID")
    if not uid:
        # No series UID: files of one acquisition still share these fields.
        fields = "|".join(
            _text(dataset, key)
            for key in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality")
        )
        uid = "unnamed-" + hashlib.sha1(fields.encode("utf-8")).hexdigest()[:10]
    try:
        orientation = tuple(round(float(value), _ORIENTATION_DECIMALS) for value in dataset.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        orientation = ()
    return uid, (int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0), orientation)


def _is_scalar_image(dataset) -> bool:
    if _text(dataset, "Modality").upper() in _NON_IMAGE_MODALITIES:
        return False
    if "Rows" not in dataset or "Columns" not in dataset:
        return False
    return int(dataset.get("SamplesPerPixel", 1) or 1) == 1


def list_dicom_series(folder: str | Path) -> list[tuple[str, list[Path], dict[str, str]]]:
    """List the scalar image series of a DICOM folder (searched recursively).

    Files are grouped by SeriesInstanceUID. Files with a blank UID are grouped by study, frame of reference,
    series number, description and modality instead. Groups are split further by image size and orientation,
    and each group is sorted by position along the slice normal, or by InstanceNumber and file name when
    positions are missing. Files that are not DICOM, and SEG, RTSTRUCT, SR and colour objects, are skipped.

    Returns:
        ``[(series_key, files, metadata)]``: series_key is the SeriesInstanceUID (or an ``unnamed-<hash>`` key,
        with ``#<n>`` appended when one series contains several grids), files are sorted, and metadata is
        `dicom_metadata` of the first file plus ``NumberOfFiles``. Ordered by series number, then key.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InvalidInputError(f"DICOM folder not found: {folder}.")

    groups: dict[tuple[str, tuple], list[tuple[Path, Any]]] = defaultdict(list)
    for path in sorted(item for item in folder.rglob("*") if item.is_file()):
        try:
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            continue
        if _is_scalar_image(dataset):
            groups[_series_group(dataset)].append((path, dataset))

    grids_per_series: dict[str, int] = defaultdict(int)
    for uid, _ in groups:
        grids_per_series[uid] += 1

    series = []
    counters: dict[str, int] = defaultdict(int)
    for (uid, _grid), members in groups.items():
        def order(member):
            position = _slice_position(member[1])
            instance = member[1].get("InstanceNumber", None)
            return (
                position is None,
                position if position is not None else 0.0,
                int(instance) if instance not in (None, "") else 0,
                member[0].name,
            )

        members.sort(key=order)
        key = uid
        if grids_per_series[uid] > 1:
            counters[uid] += 1
            key = f"{uid}#{counters[uid]}"
        metadata = dicom_metadata(members[0][1])
        metadata["NumberOfFiles"] = str(len(members))
        series.append((key, [path for path, _ in members], metadata))

    def series_order(entry):
        number = entry[2]["SeriesNumber"]
        return (int(number) if number.lstrip("-").isdigit() else 1 << 30, entry[0])

    return sorted(series, key=series_order)


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        raise InvalidInputError(
            f"No DICOM image files found in {folder} (searched recursively; files need a DICOM header)."
        )
    if series_uid is not None:
        chosen = [entry for entry in series if series_uid in (entry[0], entry[2]["SeriesInstanceUID"])]
        if not chosen:
            raise InvalidInputError(
                f"Series {series_uid!r} not found in {folder}; available: {', '.join(entry[0] for entry in series)}."
            )
        key, files, _ = chosen[0]
    else:
        key, files, _ = max(series, key=lambda entry: len(entry[1]))
    logger.info("Reading DICOM series %s (%d files) from %s", key, len(files), folder)

    try:
        if len(files) == 1:
            return sitk.ReadImage(str(files[0]))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(path) for path in files])
        return reader.Execute()
    except RuntimeError as error:
        raise InvalidInputError(
            f"Failed to read DICOM series {key} in {folder}: {str(error).strip().splitlines()[-1]}"
        ) from error


def read_volume(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a 3D volume: NRRD, NIfTI, MetaImage, a DICOM file, or a DICOM series folder.

    Args:
        path: file, or folder of DICOM files (the series with the most files unless ``series_uid`` is given).
        series_uid: SeriesInstanceUID or `list_dicom_series` key of the series to read from a folder.

    Returns:
        A 3D SimpleITK image with its geometry (a 2D file becomes a volume of one slice); DICOM pixel values
        after the rescale slope and intercept.

    Raises:
        InvalidInputError: missing path, no DICOM files, unknown series, unreadable file or unsupported dimension.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInputError(f"Volume not found: {path}.")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        path = _existing_file(path)
        image = _read_itk_file(path)

    if image.GetNumberOfPixels() == 0:
        raise InvalidInputError(f"Volume {path} has no voxels (size {image.GetSize()}).")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InvalidInputError(f"Volume {path} has {image.GetDimension()} dimensions; expected 3.")
    return image


# --------------------------------------------------------------------------------------------------------------
# Writers


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Write a 2D mask (bool, or numbers where nonzero is foreground) as an 8-bit PNG with values 0 and 255."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise InvalidInputError(f"A mask PNG needs a non-empty H x W array; got shape {mask.shape}.")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask != 0, 255, 0).astype(np.uint8), mode="L").save(str(path))
    return path


def write_nrrd(path: str | Path, array: np.ndarray, geometry: dict[str, Any] | sitk.Image | None = None) -> Path:
    """Write a 2D or 3D scalar array (numpy order: [z,] y, x) as a compressed NRRD (or any SimpleITK format).

    Args:
        array: bool (written as uint8 0/1) or numeric.
        geometry: a dictionary from `read_image_with_geometry` / `geometry_from_image`, or a SimpleITK image of
            the same size whose geometry is copied. A 2D array with the geometry of a one-slice volume is written
            as that one-slice volume. None writes unit spacing at the origin.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim not in (2, 3) or array.size == 0:
        raise InvalidInputError(f"write_nrrd needs a non-empty 2D or 3D array; got shape {array.shape}.")

    if isinstance(geometry, sitk.Image):
        geometry = geometry_from_image(geometry)
    if geometry is not None:
        dimension = int(geometry.get("dimension", len(geometry["origin"])))
        if array.ndim == 2 and dimension == 3:
            slice_axis = geometry.get("slice_axis")
            array = np.expand_dims(array, axis=2 - (2 if slice_axis is None else slice_axis))
        if array.ndim != dimension:
            raise InvalidInputError(
                f"Array of shape {array.shape} does not fit a {dimension}D geometry; pass matching geometry."
            )

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if geometry is not None:
        expected_size = geometry.get("size")
        if expected_size is not None and tuple(expected_size) != image.GetSize():
            raise InvalidInputError(f"Array size {image.GetSize()} differs from the geometry's size {expected_size}.")
        image.SetSpacing(tuple(geometry.get("full_spacing") or geometry["spacing"]))
        image.SetOrigin(tuple(geometry["origin"]))
        image.SetDirection(tuple(geometry["direction"]))

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as error:
        raise InvalidInputError(f"Failed to write {path}: {str(error).strip().splitlines()[-1]}") from error
    return path

"""Tests of MedCLIPSAMLib.io on the real test images, converted to each supported format in a temporary folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from MedCLIPSAMLib import io
from MedCLIPSAMLib.errors import InvalidInputError


@pytest.fixture(scope="module")
def brain_png(shared_data) -> Path:
    return shared_data / "brain_mri" / "images" / "13.png"


@pytest.fixture(scope="module")
def ct_folder(shared_data) -> Path:
    return shared_data / "dicom_series" / "totalsegmentator_example_ct_dicom"


@pytest.fixture(scope="module")
def brain_array(brain_png) -> np.ndarray:
    return np.array(Image.open(brain_png))


def _reject_file(*args, **kwargs):
    raise RuntimeError("GDCM cannot read this file")


def _ct_files(ct_folder: Path) -> list[Path]:
    return sorted(path for path in ct_folder.iterdir() if path.is_file())


# ---------------------------------------------------------------------------------------------------------------
# 2D formats


def test_read_png_grey(brain_png, brain_array):
    image = io.read_image(brain_png)
    assert image.dtype == np.uint8
    assert np.array_equal(image, brain_array)


def test_read_png_rgb(shared_data):
    image = io.read_image(shared_data / "breast_ultrasound" / "images" / "benign (101).png")
    assert image.shape == (473, 563, 3)


def test_read_png_rgba_keeps_alpha(shared_data):
    image = io.read_image(shared_data / "chest_xray" / "images" / "pneumocystis-pneumonia-2-PA.png")
    assert image.ndim == 3
    assert image.shape[2] == 4


def test_read_jpeg(shared_data):
    image = io.read_image(shared_data / "chest_xray" / "images" / "kjr-21-e25-g001-l-a.jpg")
    assert image.dtype == np.uint8
    assert image.ndim == 2


def test_read_png_16bit(brain_array, tmp_path):
    values = brain_array.astype(np.uint16) * 257
    path = tmp_path / "brain16.png"
    Image.fromarray(values).save(path)
    image = io.read_image(path)
    assert image.dtype == np.uint16
    assert np.array_equal(image, values)


def test_read_tiff_16bit(brain_array, tmp_path):
    values = brain_array.astype(np.uint16) * 100
    path = tmp_path / "brain16.tif"
    Image.fromarray(values).save(path)
    image = io.read_image(path)
    assert image.dtype == np.uint16
    assert np.array_equal(image, values)


def test_read_tiff_float(brain_array, tmp_path):
    values = brain_array.astype(np.float32) / 7.0
    path = tmp_path / "brain_float.tif"
    Image.fromarray(values).save(path)
    image = io.read_image(path)
    assert image.dtype == np.float32
    assert np.array_equal(image, values)


def test_read_bmp(brain_array, tmp_path):
    path = tmp_path / "brain.bmp"
    Image.fromarray(brain_array).save(path)
    assert np.array_equal(io.read_image(path), brain_array)


def test_read_palette_png_as_rgb(brain_array, tmp_path):
    path = tmp_path / "palette.png"
    Image.fromarray(brain_array).convert("P").save(path)
    image = io.read_image(path)
    assert image.shape == brain_array.shape + (3,)


def test_read_1bit_mask_png(shared_data):
    image = io.read_image(shared_data / "breast_ultrasound" / "masks" / "benign (101)_mask.png")
    assert image.dtype == np.uint8
    assert set(np.unique(image)) <= {0, 255}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_read_itk_2d(brain_array, tmp_path, suffix):
    path = tmp_path / f"brain{suffix}"
    image = sitk.GetImageFromArray(brain_array.astype(np.int16))
    image.SetSpacing((0.5, 0.75))
    sitk.WriteImage(image, str(path))
    array, geometry = io.read_image_with_geometry(path)
    assert np.array_equal(array, brain_array.astype(np.int16))
    assert geometry["spacing"] == pytest.approx((0.5, 0.75))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_read_itk_single_slice_volume(brain_array, tmp_path, suffix):
    path = tmp_path / f"slice{suffix}"
    image = sitk.GetImageFromArray(brain_array[np.newaxis].astype(np.float32))
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(path))
    array, geometry = io.read_image_with_geometry(path)
    assert array.shape == brain_array.shape
    assert geometry["spacing"] == pytest.approx((0.8, 0.9))
    assert geometry["slice_axis"] == 2


def test_read_itk_volume_rejected(tmp_path):
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkUInt8), str(path))
    with pytest.raises(InvalidInputError) as raised:
        io.read_image(path)
    assert "segment-volume" in str(raised.value)


def test_read_dicom_slice_rescaled(ct_folder):
    path = _ct_files(ct_folder)[0]
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    image, geometry = io.read_image_with_geometry(path)
    assert np.issubdtype(image.dtype, np.integer)
    assert np.array_equal(image, expected)
    assert geometry["origin"] == pytest.approx([float(value) for value in dataset.ImagePositionPatient])


def test_read_dicom_float_slope(ct_folder, tmp_path):
    dataset = pydicom.dcmread(_ct_files(ct_folder)[0])
    dataset.RescaleSlope = 0.5
    path = tmp_path / "slope.dcm"
    dataset.save_as(path)
    expected = dataset.pixel_array * 0.5 + float(dataset.RescaleIntercept)
    image = io.read_image(path)
    assert image.dtype == np.float32
    assert np.allclose(image, expected)


def test_read_dicom_pydicom_fallback(ct_folder, monkeypatch):
    path = _ct_files(ct_folder)[0]
    expected, expected_geometry = io.read_image_with_geometry(path)

    monkeypatch.setattr(io.sitk, "ReadImage", _reject_file)
    image, geometry = io.read_image_with_geometry(path)
    assert image.dtype == expected.dtype
    assert np.array_equal(image, expected)
    assert geometry["origin"] == pytest.approx(expected_geometry["origin"])
    assert geometry["spacing"] == pytest.approx(expected_geometry["spacing"])


@pytest.mark.parametrize("reader", ["simpleitk", "pydicom"])
def test_read_dicom_monochrome1_inverted(ct_folder, tmp_path, monkeypatch, reader):
    dataset = pydicom.dcmread(_ct_files(ct_folder)[0])
    stored = dataset.pixel_array.astype(np.int64)
    expected = ((1 << int(dataset.BitsStored)) - 1 - stored) * int(dataset.RescaleSlope) + int(dataset.RescaleIntercept)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "monochrome1.dcm"
    dataset.save_as(path)
    if reader == "pydicom":
        monkeypatch.setattr(io.sitk, "ReadImage", _reject_file)
    image = io.read_image(path)
    assert np.array_equal(image, expected)


def test_read_dicom_written_by_simpleitk(brain_array, tmp_path):
    path = tmp_path / "brain.dcm"
    sitk.WriteImage(sitk.GetImageFromArray(brain_array.astype(np.int16)), str(path))
    assert np.array_equal(io.read_image(path), brain_array)


def test_read_dicom_multiframe_rejected(ct_folder, tmp_path):
    dataset = pydicom.dcmread(_ct_files(ct_folder)[0])
    dataset.NumberOfFrames = 2
    path = tmp_path / "multiframe.dcm"
    dataset.save_as(path)
    with pytest.raises(InvalidInputError) as raised:
        io.read_image(path)
    assert "segment-volume" in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_read_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n", encoding="utf-8")
    with pytest.raises(InvalidInputError) as raised:
        io.read_image(path)
    assert str(path) in str(raised.value)


def test_read_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(InvalidInputError) as raised:
        io.read_image(path)
    assert "not found" in str(raised.value)


def test_read_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidInputError) as raised:
        io.read_image(path)
    assert "empty" in str(raised.value)


def test_read_truncated_png(brain_png, tmp_path):
    path = tmp_path / "truncated.png"
    data = brain_png.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError):
        io.read_image(path)


def test_read_multipage_tiff_rejected(brain_array, tmp_path):
    path = tmp_path / "pages.tif"
    pages = [Image.fromarray(brain_array), Image.fromarray(brain_array)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(InvalidInputError):
        io.read_image(path)


# ---------------------------------------------------------------------------------------------------------------
# Volumes and DICOM series


def test_read_volume_dicom_series(ct_folder):
    volume = io.read_volume(ct_folder)
    assert volume.GetSize() == (512, 512, 20)
    assert volume.GetSpacing()[2] == pytest.approx(2.0)


def test_read_volume_slices_sorted(ct_folder):
    volume = io.read_volume(ct_folder)
    lowest = min(_ct_files(ct_folder), key=lambda path: float(pydicom.dcmread(path).ImagePositionPatient[2]))
    first_slice = sitk.GetArrayFromImage(volume)[0]
    assert np.array_equal(first_slice, io.read_image(lowest))


def test_list_dicom_series_skips_other_files(ct_folder, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(ct_folder, folder / "ct")
    (folder / "README.txt").write_text("not DICOM\n", encoding="utf-8")
    series = io.list_dicom_series(folder)
    assert len(series) == 1
    assert len(series[0][1]) == 20


def test_list_dicom_series_metadata(ct_folder):
    _, _, metadata = io.list_dicom_series(ct_folder)[0]
    assert metadata["Modality"] == "CT"
    assert metadata["name"] == "anonymous_20221208_CT_Body_3.0"


def test_read_volume_unknown_series(ct_folder):
    with pytest.raises(InvalidInputError):
        io.read_volume(ct_folder, series_uid="1.2.3.4")


def test_read_volume_no_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing\n", encoding="utf-8")
    with pytest.raises(InvalidInputError) as raised:
        io.read_volume(tmp_path)
    assert "No DICOM" in str(raised.value)


def test_read_volume_nrrd(shared_data):
    volume = io.read_volume(shared_data / "volumes" / "pyradiomics_brain1" / "brain1_image.nrrd")
    assert volume.GetDimension() == 3


def test_read_volume_missing(tmp_path):
    with pytest.raises(InvalidInputError):
        io.read_volume(tmp_path / "missing.nrrd")


# ---------------------------------------------------------------------------------------------------------------
# Writers


def test_write_mask_png_values(tmp_path):
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 3:9] = True
    path = io.write_mask_png(tmp_path / "out" / "mask.png", mask)
    written = np.array(Image.open(path))
    assert written.dtype == np.uint8
    assert np.array_equal(written, mask.astype(np.uint8) * 255)


def test_write_nrrd_keeps_slice_geometry(brain_array, tmp_path):
    source = tmp_path / "slice.nrrd"
    image = sitk.GetImageFromArray(brain_array[np.newaxis])
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(source))
    array, geometry = io.read_image_with_geometry(source)

    output = io.write_nrrd(tmp_path / "mask.nrrd", array > 100, geometry)
    written = sitk.ReadImage(str(output))
    assert written.GetSize() == (512, 512, 1)
    assert written.GetOrigin() == pytest.approx((10.0, 20.0, 30.0))
    assert written.GetSpacing() == pytest.approx((0.8, 0.9, 3.0))
    assert np.array_equal(sitk.GetArrayFromImage(written)[0], (array > 100).astype(np.uint8))


def test_write_nrrd_volume_reference(ct_folder, tmp_path):
    volume = io.read_volume(ct_folder)
    mask = sitk.GetArrayFromImage(volume) > 0
    written = sitk.ReadImage(str(io.write_nrrd(tmp_path / "ct_mask.nrrd", mask, volume)))
    assert written.GetOrigin() == pytest.approx(volume.GetOrigin())
    assert written.GetSpacing() == pytest.approx(volume.GetSpacing())


def test_write_nrrd_size_mismatch(ct_folder, tmp_path):
    volume = io.read_volume(ct_folder)
    with pytest.raises(InvalidInputError):
        io.write_nrrd(tmp_path / "bad.nrrd", np.zeros((2, 4, 4), dtype=np.uint8), volume)

"""`medclipsam segment-volume` on real volumes with the tiny models: outputs load back with the input's geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.errors import InvalidInputError

MR_VOLUME = "volumes/pyradiomics_brain1/brain1_image.nrrd"
CT_SERIES = "dicom_series/totalsegmentator_example_ct_dicom"
SLICER_KEYS = (
    "Segment0_Name", "Segment0_ID", "Segment0_Layer", "Segment0_LabelValue", "Segment0_Color", "Segment0_Extent",
    "Segmentation_MasterRepresentation", "Segmentation_ContainedRepresentationNames",
    "Segmentation_ReferenceImageExtentOffset",
)


@pytest.fixture(scope="module")
def model_args(tiny_clip_id, tiny_sam_checkpoint) -> list[str]:
    return ["--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
            "--device", "cpu", "--top-k", "4", "--batch-size", "4", "--no-download"]


def _assert_same_geometry(image, reference):
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def _processed_only(array: np.ndarray, axis: int, indices: list[int]) -> bool:
    """True when every non-zero voxel lies on one of the given slices along `axis`."""
    others = tuple(dimension for dimension in range(3) if dimension != axis)
    nonzero_slices = np.flatnonzero(np.any(array != 0, axis=others))
    return set(nonzero_slices.tolist()) <= set(indices)


def test_mr_volume_outputs(shared_data, model_args, tmp_path):
    volume_path = shared_data / MR_VOLUME

    code = main(["segment-volume", str(volume_path), "--prompt", "brain tumor", "--prompt", "brain",
                 "--output", str(tmp_path), "--slice-range", "12", "14", *model_args])

    assert code == 0
    reference = sitk.ReadImage(str(volume_path))
    for name, prompt in (("brain_tumor", "brain tumor"), ("brain", "brain")):
        segmentation = sitk.ReadImage(str(tmp_path / f"brain1_image_{name}.seg.nrrd"))
        saliency = sitk.ReadImage(str(tmp_path / f"brain1_image_{name}_saliency.nrrd"))
        _assert_same_geometry(segmentation, reference)
        _assert_same_geometry(saliency, reference)
        assert saliency.GetPixelID() == sitk.sitkFloat32
        for key in SLICER_KEYS:
            assert segmentation.HasMetaDataKey(key), key
        assert segmentation.GetMetaData("Segment0_Name") == prompt
        assert segmentation.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
        report = json.loads((tmp_path / f"brain1_image_{name}.json").read_text())
        assert report["processed_slices"] == [12, 13]
        values = sitk.GetArrayFromImage(saliency)
        assert _processed_only(values, report["array_axis"], [12, 13])
        assert values.max() > 0.0


def test_dicom_series_outputs(shared_data, model_args, tmp_path):
    from MedCLIPSAMLib.io import read_volume

    series = shared_data / CT_SERIES

    code = main(["segment-volume", str(series), "--prompt", "liver", "--output", str(tmp_path),
                 "--slice-range", "10", "11", *model_args])

    assert code == 0
    reference = read_volume(series)
    stem = "totalsegmentator_example_ct_dicom_liver"
    _assert_same_geometry(sitk.ReadImage(str(tmp_path / f"{stem}.seg.nrrd")), reference)
    _assert_same_geometry(sitk.ReadImage(str(tmp_path / f"{stem}_saliency.nrrd")), reference)


def _write_volume(path, direction: np.ndarray):
    generator = np.random.default_rng(0)
    array = generator.normal(100, 10, size=(20, 24, 28)).astype(np.int16)  # [K, J, I]
    array[5:15, 6:18, 8:20] += 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.2, 2.0))
    image.SetOrigin((12.5, -40.0, 7.0))
    image.SetDirection(direction.reshape(-1).tolist())
    sitk.WriteImage(image, str(path))
    return image


# LPS direction columns (I, J, K). Permuted: I -> S, J -> P, K -> L, so K slices are sagittal.
PERMUTED = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _oblique() -> np.ndarray:
    angle = np.deg2rad(30.0)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])


@pytest.mark.parametrize(
    ("name", "direction", "axis", "expected_array_axis"),
    [("permuted", PERMUTED, "sagittal", 0), ("permuted", PERMUTED, "axial", 2), ("oblique", _oblique(), "axial", 0)],
)
def test_non_axial_volumes(model_args, tmp_path, name, direction, axis, expected_array_axis):
    volume_path = tmp_path / f"{name}.nrrd"
    reference = _write_volume(volume_path, direction)
    output = tmp_path / "out"

    code = main(["segment-volume", str(volume_path), "--prompt", "mass", "--axis", axis, "--output", str(output),
                 "--slice-range", "8", "9", *model_args])

    assert code == 0
    report = json.loads((output / f"{name}_mass.json").read_text())
    assert report["array_axis"] == expected_array_axis
    segmentation = sitk.ReadImage(str(output / f"{name}_mass.seg.nrrd"))
    saliency = sitk.ReadImage(str(output / f"{name}_mass_saliency.nrrd"))
    _assert_same_geometry(segmentation, reference)
    _assert_same_geometry(saliency, reference)
    values = sitk.GetArrayFromImage(saliency)
    assert _processed_only(values, expected_array_axis, [8])
    assert values.max() > 0.0


def test_output_loads_in_slicer_segmentation_node(model_args, tmp_path):
    slicer = pytest.importorskip("slicer")
    volume_path = tmp_path / "oblique.nrrd"
    reference = _write_volume(volume_path, _oblique())
    main(["segment-volume", str(volume_path), "--prompt", "mass", "--output", str(tmp_path),
          "--slice-range", "8", "10", *model_args])
    scene = slicer.vtkMRMLScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage_node = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage_node.SetFileName(str(tmp_path / "oblique_mass.seg.nrrd"))

    assert storage_node.ReadData(segmentation_node)

    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "mass"
    tag = __import__("vtk").reference("")
    assert segment.GetTag("MedCLIPSAM.Precision", tag)
    assert str(tag) in ("float32", "bfloat16")
    labelmap = segment.GetRepresentation("Binary labelmap")
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    from MedCLIPSAMLib.geometry import ijk_to_ras_from_itk

    expected = ijk_to_ras_from_itk(reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    actual = np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])
    assert np.allclose(actual, expected, atol=1e-4)


def test_slice_range_past_volume_is_usage_error(shared_data, model_args, tmp_path):
    code = main(["segment-volume", str(shared_data / MR_VOLUME), "--prompt", "brain", "--output", str(tmp_path),
                 "--slice-range", "20", "400", *model_args])

    assert code == 2


def test_empty_prompt_is_usage_error(model_args, tmp_path):
    code = main(["segment-volume", str(tmp_path / "missing.nrrd"), "--prompt", " ", "--output", str(tmp_path),
                 *model_args])

    assert code == 2


def test_missing_volume_fails(model_args, tmp_path, capsys):
    code = main(["segment-volume", str(tmp_path / "missing.nrrd"), "--prompt", "liver", "--output", str(tmp_path),
                 *model_args])

    assert code == 1
    assert "missing.nrrd" in capsys.readouterr().err


def test_bfloat16_keeps_float32_weights(shared_data, model_args, tmp_path, capsys):
    volume_path = shared_data / MR_VOLUME

    code = main(["segment-volume", str(volume_path), "--prompt", "brain", "--output", str(tmp_path),
                 "--slice-range", "12", "13", "--dtype", "bfloat16", "--presence-threshold", "1000", *model_args])

    assert code == 0
    report = json.loads((tmp_path / "brain1_image_brain.json").read_text())
    assert report["precision"] == "bfloat16"
    assert report["parameters"]["precision"] == "bfloat16"
    assert report["skipped_slices"] == [12]
    assert "1 skipped by the presence rule" in capsys.readouterr().out


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_reports_the_type_used(shared_data, model_args, tmp_path, monkeypatch, native, expected):
    import MedCLIPSAMLib.pipeline as pipeline

    monkeypatch.setattr(pipeline, "native_bfloat16", lambda device: native)
    code = main(["segment-volume", str(shared_data / MR_VOLUME), "--prompt", "brain", "--output", str(tmp_path),
                 "--slice-range", "12", "13", "--presence-threshold", "1000", *model_args])

    assert code == 0
    report = json.loads((tmp_path / "brain1_image_brain.json").read_text())
    assert report["precision"] == expected
    assert report["parameters"]["precision"] == "auto"


def test_progress_bar_counts_slices(shared_data, model_args, tmp_path, capsys):
    code = main(["segment-volume", str(shared_data / MR_VOLUME), "--prompt", "brain", "--output", str(tmp_path),
                 "--slice-range", "12", "14", "--presence-threshold", "1000", *model_args])

    assert code == 0
    err = capsys.readouterr().err
    assert "brain: 100%" in err
    assert "2/2" in err
    assert err.endswith("\n")


def test_segment_tag_with_separator_rejected(tmp_path):
    from MedCLIPSAMLib.cli.volume import write_slicer_segmentation

    reference = sitk.Image(4, 3, 2, sitk.sitkUInt8)
    with pytest.raises(InvalidInputError, match="segment tag"):
        write_slicer_segmentation(tmp_path / "a.seg.nrrd", np.zeros((2, 3, 4), np.uint8), reference, "a",
                                  tags={"key": "a|b"})

"""DICOM batch of the Logic: file names from patient, study and series, and failures reported per case."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedCLIPSAMModule.batch import STATUS_FAILED, STATUS_OK, caseName, segmentDicomFolder
from MedCLIPSAMModule.logic import MedCLIPSAMLogic

CT_FOLDER = "dicom_series/totalsegmentator_example_ct_dicom"


def test_case_name_uses_fields():
    metadata = {"PatientID": "P 01", "StudyDescription": "Abdomen/Pelvis", "SeriesDescription": "CT Body 3.0"}

    assert caseName(metadata, "key") == "P_01_Abdomen_Pelvis_CT_Body_3.0"


def test_case_name_fallbacks_for_blanks():
    metadata = {"PatientID": "", "PatientName": "", "StudyDescription": " ", "StudyDate": "", "StudyInstanceUID": "",
                "SeriesDescription": "", "SeriesNumber": "", "SeriesInstanceUID": ""}

    assert caseName(metadata, "unnamed-80050200ae") == "UnknownPatient_UnknownStudy_unnamed-80050200ae"


def test_case_name_series_number_fallback():
    metadata = {"PatientName": "Doe^Jane", "StudyDate": "20221208", "SeriesNumber": "3"}

    assert caseName(metadata, "key") == "Doe_Jane_20221208_Series3"


def _data_node_count(scene) -> int:
    """Count the nodes other than colour tables (the Logic adds its heat colour table once per scene)."""
    return scene.GetNumberOfNodes() - scene.GetNumberOfNodesByClass("vtkMRMLColorNode")


def _broken_copy(source, target_folder):
    """Write a copy of one CT file that is its own series (other description) with truncated pixel data."""
    dataset = pydicom.dcmread(str(source))
    dataset.SeriesDescription = "Broken copy"
    path = target_folder / "broken.dcm"
    dataset.save_as(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])
    return path


def test_batch_writes_files_and_reports_broken_case(scene, shared_data, tiny_segmenter, tmp_path):
    dicom_root = tmp_path / "dicom"
    good = dicom_root / "good"
    broken = dicom_root / "broken"
    broken.mkdir(parents=True)
    shutil.copytree(shared_data / CT_FOLDER, good)
    _broken_copy(sorted(good.iterdir())[0], broken)
    output = tmp_path / "out"
    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(tiny_segmenter)
    nodes_before = _data_node_count(scene)

    results = segmentDicomFolder(logic, dicom_root, ["liver", "spleen"], output, axis="axial", sliceRange=(10, 11))

    statuses = {(result.caseName, result.prompt): result.status for result in results}
    assert len(results) == 4
    good_name = "UnknownPatient_20221208_CT_Body_3.0"
    broken_name = "UnknownPatient_20221208_Broken_copy"
    assert statuses[(good_name, "liver")] == STATUS_OK
    assert statuses[(good_name, "spleen")] == STATUS_OK
    assert statuses[(broken_name, "liver")] == STATUS_FAILED
    failure = next(result for result in results if result.status == STATUS_FAILED)
    assert failure.message
    for prompt in ("liver", "spleen"):
        assert (output / f"{good_name}_{prompt}.seg.nrrd").is_file()
        assert (output / f"{good_name}_{prompt}_saliency.nrrd").is_file()
    assert not list(output.glob(f"{broken_name}*"))
    assert _data_node_count(scene) == nodes_before


def test_batch_files_have_input_geometry(scene, shared_data, tiny_segmenter, tmp_path):
    from MedCLIPSAMLib.io import read_volume

    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(tiny_segmenter)

    results = segmentDicomFolder(logic, shared_data / CT_FOLDER, ["liver"], tmp_path, sliceRange=(10, 11))

    reference = read_volume(shared_data / CT_FOLDER)
    segmentation = sitk.ReadImage(str(results[0].segmentationPath))
    saliency = sitk.ReadImage(str(results[0].saliencyPath))
    for image in (segmentation, saliency):
        assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert saliency.GetSize() == reference.GetSize()
    assert saliency.GetPixelID() == sitk.sitkFloat32
    assert segmentation.GetMetaData("Segment0_Name") == "liver"
    assert segmentation.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"




def test_batch_missing_folder_rejected(scene, tiny_segmenter, tmp_path):
    from MedCLIPSAMLib.errors import InvalidInputError

    logic = MedCLIPSAMLogic(scene)
    logic.setSegmenter(tiny_segmenter)

    with pytest.raises(InvalidInputError):
        segmentDicomFolder(logic, tmp_path / "missing", ["liver"], tmp_path / "out")

"""End-to-end tests of `medclipsam segment` with the tiny models on real images of every supported kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedCLIPSAMLib.cli import main

PROMPT = "lesion"
OUTPUT_SUFFIXES = ("_mask.png", "_mask.nrrd", "_saliency.nrrd", "_saliency.png", "_overlay.png", ".json")
NRRD_SPACING = (0.8, 0.6)
NRRD_ORIGIN = (12.5, -40.0)


@pytest.fixture(scope="module")
def model_args(tiny_clip_id, tiny_sam_checkpoint) -> list[str]:
    return ["--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu"]


@pytest.fixture(scope="module")
def brain_slice(shared_data) -> np.ndarray:
    """Real brain MRI slice cropped to a non-square 8-bit gray image (360 x 480)."""
    with Image.open(shared_data / "brain_mri" / "images" / "13.png") as image:
        return np.array(image.convert("L"))[40:400, 20:500]


def _write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """Write a single-frame MR DICOM file (16-bit, rescale intercept -1024) holding `pixels`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "MR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelSpacing = [0.5, 0.7]
    dataset.ImagePositionPatient = [-100.0, -120.0, 30.0]
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    dataset.RescaleSlope = 1
    dataset.RescaleIntercept = -1024
    dataset.PixelData = (pixels.astype(np.uint16) * 8 + 1024).tobytes()
    dataset.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def inputs(shared_data, brain_slice, tmp_path_factory) -> dict[str, Path]:
    """Real images in every input format the command reads, keyed by a short name."""
    folder = tmp_path_factory.mktemp("segment_inputs")
    paths = {
        "ultrasound_png": shared_data / "breast_ultrasound" / "images" / "benign (101).png",
        "brain_png": shared_data / "brain_mri" / "images" / "13.png",
        "xray_jpeg": shared_data / "chest_xray" / "images" / "kjr-21-e25-g001-l-a.jpg",
        "xray_rgba_png": shared_data / "chest_xray" / "images" / "pneumocystis-pneumonia-2-PA.png",
    }

    sixteen_bit = folder / "brain16.png"
    Image.fromarray(brain_slice.astype(np.uint16) * 257).save(sixteen_bit)
    paths["png16"] = sixteen_bit

    paths["dicom"] = _write_dicom(folder / "brain_dicom.dcm", brain_slice)

    image = sitk.GetImageFromArray(brain_slice.astype(np.int16) * 4 - 200)
    image.SetSpacing(NRRD_SPACING)
    image.SetOrigin(NRRD_ORIGIN)
    paths["nrrd"] = folder / "brain_slice.nrrd"
    sitk.WriteImage(image, str(paths["nrrd"]))
    return paths


def _input_size(path: Path) -> tuple[int, int]:
    """Return (height, width) of an input image read independently of the command."""
    if path.suffix in (".nrrd", ".dcm"):
        width, height = sitk.ReadImage(str(path)).GetSize()[:2]
        return height, width
    with Image.open(path) as image:
        return image.height, image.width


@pytest.fixture(scope="module")
def good_run(inputs, model_args, tmp_path_factory):
    """One in-process run over every good input; returns (exit code, output folder, captured stderr)."""
    output = tmp_path_factory.mktemp("segment_output")
    argv = ["segment", *map(str, inputs.values()), "--prompt", PROMPT, "--output", str(output), "--top-k", "8"]
    code = main(argv + model_args)
    return code, output


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def test_good_run_exit_code(good_run):
    code, _ = good_run
    assert code == 0


@pytest.mark.parametrize(
    "name", ["ultrasound_png", "brain_png", "xray_jpeg", "xray_rgba_png", "png16", "dicom", "nrrd"]
)
def test_writes_every_output(good_run, inputs, name):
    _, output = good_run
    stem = _stem(inputs[name])
    for suffix in OUTPUT_SUFFIXES:
        assert (output / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"


@pytest.mark.parametrize(
    "name", ["ultrasound_png", "brain_png", "xray_jpeg", "xray_rgba_png", "png16", "dicom", "nrrd"]
)
def test_output_sizes_match_input(good_run, inputs, name):
    _, output = good_run
    stem = _stem(inputs[name])
    height, width = _input_size(inputs[name])

    with Image.open(output / f"{stem}_mask.png") as mask_png:
        mask = np.array(mask_png)
    with Image.open(output / f"{stem}_overlay.png") as overlay_png:
        overlay_size = (overlay_png.height, overlay_png.width)
    with Image.open(output / f"{stem}_saliency.png") as saliency_png:
        saliency_size = (saliency_png.height, saliency_png.width)
    mask_nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{stem}_mask.nrrd")))
    saliency_nrrd = sitk.ReadImage(str(output / f"{stem}_saliency.nrrd"))

    assert mask.shape == (height, width)
    assert set(np.unique(mask)) <= {0, 255}
    assert overlay_size == (height, width)
    assert saliency_size == (height, width)
    assert mask_nrrd.squeeze().shape == (height, width)
    assert np.array_equal(mask_nrrd.squeeze() > 0, mask > 0)
    assert saliency_nrrd.GetPixelID() == sitk.sitkFloat32


def test_mask_nrrd_keeps_input_geometry(good_run, inputs):
    _, output = good_run
    mask = sitk.ReadImage(str(output / f"{_stem(inputs['nrrd'])}_mask.nrrd"))
    saliency = sitk.ReadImage(str(output / f"{_stem(inputs['nrrd'])}_saliency.nrrd"))

    assert mask.GetSpacing() == pytest.approx(NRRD_SPACING)
    assert mask.GetOrigin() == pytest.approx(NRRD_ORIGIN)
    assert saliency.GetSpacing() == pytest.approx(NRRD_SPACING)
    assert saliency.GetOrigin() == pytest.approx(NRRD_ORIGIN)


def test_dicom_mask_keeps_pixel_spacing(good_run, inputs):
    _, output = good_run
    mask = sitk.ReadImage(str(output / f"{_stem(inputs['dicom'])}_mask.nrrd"))
    # DICOM PixelSpacing is (row spacing, column spacing) = (0.5, 0.7); ITK spacing is (x, y).
    assert mask.GetSpacing()[:2] == pytest.approx((0.7, 0.5))


def test_json_report_contents(good_run, inputs, tiny_clip_id, tiny_sam_checkpoint):
    _, output = good_run
    report = json.loads((output / f"{_stem(inputs['ultrasound_png'])}.json").read_text(encoding="utf-8"))
    height, width = _input_size(inputs["ultrasound_png"])

    assert report["prompt"] == PROMPT
    assert report["clip_model"] == tiny_clip_id
    assert report["sam_type"] == "tiny"
    assert report["sam_checkpoint"] == str(tiny_sam_checkpoint)
    assert report["image"]["width"] == width
    assert report["image"]["height"] == height
    assert report["parameters"]["top_k"] == 8
    assert isinstance(report["found"], bool)
    assert isinstance(report["clip_score"], float)
    assert set(report["seconds"]) >= {"prepare", "saliency", "crf", "boxes", "sam"}
    assert "version" in report
    for box in report["boxes"]:
        assert len(box) == 4


def test_bad_inputs_fail_others_succeed(inputs, model_args, tmp_path, capsys):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image\n", encoding="utf-8")
    one_pixel = tmp_path / "one_pixel.png"
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(one_pixel)
    all_nan = tmp_path / "all_nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((40, 50), np.nan, np.float32)), str(all_nan))
    missing = tmp_path / "missing.png"
    good = inputs["xray_jpeg"]
    output = tmp_path / "out"

    bad = [text_file, one_pixel, all_nan, missing]
    argv = ["segment", str(text_file), str(good), str(one_pixel), str(all_nan), str(missing)]
    code = main(argv + ["--prompt", PROMPT, "--output", str(output), "--top-k", "8"] + model_args)
    failure_lines = [line for line in capsys.readouterr().err.splitlines() if ": failed: " in line]

    assert code == 1
    assert (output / f"{_stem(good)}_mask.png").is_file()
    assert len(failure_lines) == len(bad)
    for path in bad:
        assert any(str(path) in line for line in failure_lines), f"no failure line names {path}"
        assert not (output / f"{_stem(path)}.json").exists()


def test_empty_prompt_exits_before_loading(tmp_path, inputs, capsys):
    # The checkpoint does not exist: reaching model loading would give a different message and exit code 1.
    argv = ["segment", str(inputs["brain_png"]), "--prompt", "  ", "--output", str(tmp_path / "out")]
    code = main(argv + ["--sam-type", "tiny", "--sam-checkpoint", str(tmp_path / "absent.pth")])
    error = capsys.readouterr().err

    assert code == 2
    assert "prompt" in error
    assert "model loading" not in error


def test_invalid_parameter_exits_2(tmp_path, inputs, model_args, capsys):
    argv = ["segment", str(inputs["brain_png"]), "--prompt", PROMPT, "--output", str(tmp_path / "out")]
    code = main(argv + model_args + ["--crf-tau", "0"])
    assert code == 2
    assert "crf_tau" in capsys.readouterr().err


def test_missing_checkpoint_stops_run(tmp_path, inputs, tiny_clip_id, capsys):
    absent = tmp_path / "absent.pth"
    argv = ["segment", str(inputs["brain_png"]), "--prompt", PROMPT, "--output", str(tmp_path / "out")]
    code = main(argv + ["--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(absent)])
    error = capsys.readouterr().err

    assert code == 1
    assert str(absent) in error
    assert not list((tmp_path / "out").glob("*.json"))


def test_truncated_checkpoint_stops_run(tmp_path, inputs, tiny_clip_id, tiny_sam_checkpoint, capsys):
    truncated = tmp_path / "truncated.pth"
    data = tiny_sam_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    argv = ["segment", str(inputs["brain_png"]), "--prompt", PROMPT, "--output", str(tmp_path / "out")]
    code = main(argv + ["--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(truncated)])
    error = capsys.readouterr().err

    assert code == 1
    assert "model loading failed" in error
    assert not list((tmp_path / "out").glob("*.json"))


def test_same_stem_inputs_kept_apart(tmp_path, brain_slice, model_args):
    first = tmp_path / "a" / "slice.png"
    second = tmp_path / "b" / "slice.png"
    for path in (first, second):
        path.parent.mkdir()
        Image.fromarray(np.ascontiguousarray(brain_slice[::4, ::4])).save(path)
    output = tmp_path / "out"
    code = main(["segment", str(first), str(second), "--prompt", PROMPT, "--output", str(output), "--top-k", "8"] + model_args)

    assert code == 0
    assert (output / "slice.json").is_file()
    assert (output / "slice_2.json").is_file()


def test_module_entry_point_subprocess(tmp_path, inputs, model_args):
    repository_root = Path(__file__).resolve().parents[2]
    environment = dict(os.environ, PYTHONPATH=str(repository_root))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "MedCLIPSAMLib", "segment", str(inputs["xray_jpeg"]), "--prompt", PROMPT]
    command += ["--output", str(output), "--top-k", "8"] + model_args
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr
    assert (output / f"{_stem(inputs['xray_jpeg'])}_mask.png").is_file()


def test_missing_images_reported_before_loading(tmp_path, capsys):
    # The checkpoint does not exist: reaching model loading would print "model loading failed".
    missing = tmp_path / "missing.png"
    output = tmp_path / "out"
    argv = ["segment", str(missing), "--prompt", PROMPT, "--output", str(output)]
    code = main(argv + ["--sam-type", "tiny", "--sam-checkpoint", str(tmp_path / "absent.pth")])
    error = capsys.readouterr().err

    assert code == 1
    assert f"{missing}: failed: image file not found" in error
    assert "model loading" not in error
    assert not output.exists()


def test_success_prints_summary(inputs, model_args, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["segment", str(inputs["brain_png"]), "--prompt", PROMPT, "--output", str(output), "--top-k", "4"]

    code = main(argv + model_args)

    assert code == 0
    assert f"{PROMPT}: found in" in capsys.readouterr().out

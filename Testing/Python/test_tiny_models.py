"""The tiny random-weight models: built on first use and run through the same loaders as the real ones."""

from __future__ import annotations

import json

import torch

from MedCLIPSAMLib import models
from MedCLIPSAMLib.cli import main as cli_main


def test_tiny_clip_built_on_first_use(tmp_path):
    bundle = models.load_clip(models.TINY_CLIP_ID, device="cpu", models_dir=tmp_path)
    folder = tmp_path / models.TINY_CLIP_FOLDER_NAME
    assert (folder / "open_clip_config.json").is_file()
    assert (folder / "open_clip_model.safetensors").is_file()
    assert bundle.image_size == 224
    assert not bundle.model.training


def test_tiny_clip_same_weights_each_build(tmp_path):
    first = models.load_clip(models.TINY_CLIP_ID, device="cpu", models_dir=tmp_path / "a")
    second = models.load_clip(models.TINY_CLIP_ID, device="cpu", models_dir=tmp_path / "b")
    first_state = first.model.state_dict()
    second_state = second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)


def test_tiny_sam_built_without_checkpoint(tmp_path):
    sam = models.load_sam("tiny", device="cpu", models_dir=tmp_path)
    assert (tmp_path / models.SAM_FOLDER_NAME / models.TINY_SAM_FILE_NAME).is_file()
    assert sam.image_encoder.img_size == 256


def test_segment_runs_offline_with_tiny_models(tmp_path, bundled_data):
    image = sorted((bundled_data / "breast_ultrasound" / "images").glob("*.png"))[0]
    output = tmp_path / "out"
    exit_code = cli_main(
        [
            "segment", str(image), "--prompt", "breast tumor", "--output", str(output),
            "--clip", "tiny", "--sam-type", "tiny", "--models-dir", str(tmp_path / "models"),
            "--device", "cpu", "--top-k", "8",
        ]
    )
    assert exit_code == 0
    record = json.loads((output / f"{image.stem}.json").read_text())
    assert record["prompt"] == "breast tumor"
    assert (output / f"{image.stem}_mask.png").is_file()
    assert (output / f"{image.stem}_overlay.png").is_file()

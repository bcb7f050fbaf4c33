"""Fine-tuning: caption CSV reading and cleaning, the split, training the tiny model, saving, resuming, the CLI."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from MedCLIPSAMLib.errors import CancelledError, InvalidInputError
from MedCLIPSAMLib.finetune.data import clean_caption, load_rgb_image, read_caption_csv, split_pairs
from MedCLIPSAMLib.finetune.losses import ContrastiveLoss
from MedCLIPSAMLib.finetune.trainer import FinetuneConfig, finetune_clip, validation_loss

# One caption per modality, so that the tiny model can learn the task from a few dozen images.
CAPTIONS = {
    "breast_ultrasound": "breast ultrasound image showing a tumor",
    "brain_mri": "brain mri slice showing a tumor",
    "chest_xray": "chest x ray radiograph of the lungs with pneumonia",
}
IMAGES_PER_CATEGORY = 12
# Settings that train the randomly initialised tiny model visibly in a few seconds; at 3e-3 it sometimes
# collapsed to one embedding for every input.
TEST_CONFIG = dict(learning_rate=1e-3, lr_decay=1.0, epochs=15, batch_size=8, validation_fraction=0.25)


def _variant(image: Image.Image, variant: int) -> Image.Image:
    if variant % 3 == 1:
        return ImageOps.mirror(image)
    if variant % 3 == 2:
        width, height = image.size
        return image.crop((width // 10, height // 10, width - width // 10, height - height // 10))
    return image


def build_caption_set(shared_data: Path, folder: Path, per_category: int = IMAGES_PER_CATEGORY) -> Path:
    """Write `per_category` downscaled images per modality and a CSV with relative paths, and return the CSV path.

    When the data has fewer images, mirrored and cropped copies fill the set."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for category, caption in CAPTIONS.items():
        sources = sorted((shared_data / category / "images").iterdir())
        for number in range(per_category):
            with Image.open(sources[number % len(sources)]) as image:
                image = image.convert("RGB")
                image.thumbnail((256, 256))
            name = f"{category}_{number:02d}.png"
            _variant(image, number // len(sources)).save(folder / "images" / name)
            rows.append((f"images/{name}", caption))
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "caption"])
        writer.writerows(rows)
    return folder / "pairs.csv"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Train on one thread: on a CPU shared with other jobs, two OpenMP threads ran this module about 8x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def caption_csv(shared_data, tmp_path_factory) -> Path:
    return build_caption_set(shared_data, tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def trained(caption_csv, tiny_clip_id, tmp_path_factory):
    output = tmp_path_factory.mktemp("finetune_run")
    return finetune_clip(caption_csv, output, clip_id=tiny_clip_id, config=FinetuneConfig(**TEST_CONFIG), device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# Data


def test_clean_caption_removes_special_characters():
    assert clean_caption("  Breast   ultrasound:\ttumor #3 (arrow) <b>mass</b>  ") == (
        "Breast ultrasound: tumor 3 (arrow) b mass /b"
    )
    assert clean_caption("T1-weighted MRI, 5% contrast?") == "T1-weighted MRI, 5% contrast?"
    assert clean_caption("***") == ""


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_csv_drops_short_captions_and_resolves_paths(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name)
    csv_path = _write_csv(
        tmp_path / "pairs.csv",
        ["Filename", "Caption"],
        [
            ["img/a.png", "  chest x ray showing ## pneumonia  "],
            ["img/b.png", "too short caption"],
            [str(tmp_path / "img" / "c.png"), "brain mri slice showing a glioma"],
        ],
    )
    with caplog.at_level(logging.INFO, logger="MedCLIPSAMLib.finetune.data"):
        table = read_caption_csv(csv_path)
    assert [pair.image_path for pair in table.pairs] == [tmp_path / "img" / "a.png", tmp_path / "img" / "c.png"]
    assert table.pairs[0].caption == "chest x ray showing pneumonia"
    assert table.dropped_short == 1
    assert table.rows_read == 3
    assert (table.image_column, table.caption_column) == ("Filename", "Caption")
    assert "1 dropped" in caplog.text


def test_read_csv_named_columns_and_tabs(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    csv_path = _write_csv(
        tmp_path / "pairs.tsv", ["id", "file_name", "findings"], [["1", "x.png", "a long enough caption text"]], "\t"
    )
    table = read_caption_csv(csv_path, image_column="file_name", caption_column="findings")
    assert table.pairs[0].caption == "a long enough caption text"
    with pytest.raises(InvalidInputError, match="No image column"):
        read_caption_csv(csv_path)


def test_read_csv_reports_missing_images(tmp_path):
    csv_path = _write_csv(
        tmp_path / "pairs.csv", ["image", "caption"], [["nowhere.png", "a caption that is long enough"]]
    )
    with pytest.raises(InvalidInputError, match="nowhere.png"):
        read_caption_csv(csv_path)


def test_16_bit_image_is_windowed_to_rgb(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = np.asarray(load_rgb_image(tmp_path / "deep.png"))
    assert image.shape == (64, 64, 3)
    assert image.dtype == np.uint8
    assert image.min() == 0
    assert image.max() == 255


def test_split_is_seeded_and_disjoint(caption_csv):
    pairs = read_caption_csv(caption_csv).pairs
    train, validation = split_pairs(pairs, validation_fraction=0.15, seed=5)
    again_train, again_validation = split_pairs(pairs, validation_fraction=0.15, seed=5)
    _, other_validation = split_pairs(pairs, validation_fraction=0.15, seed=6)
    assert len(validation) == round(0.15 * len(pairs))
    assert len(train) + len(validation) == len(pairs)
    assert {pair.line for pair in train}.isdisjoint(pair.line for pair in validation)
    assert validation == again_validation
    assert train == again_train
    assert validation != other_validation


def test_split_rejects_too_few_pairs(caption_csv):
    pairs = read_caption_csv(caption_csv).pairs[:3]
    with pytest.raises(InvalidInputError, match="too few"):
        split_pairs(pairs)


# ------------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_finetune_lowers_validation_loss(trained):
    baseline = trained.history[0].validation_loss
    assert trained.history[0].epoch == 0
    assert len(trained.history) == TEST_CONFIG["epochs"] + 1
    assert trained.best_epoch >= 1
    assert trained.best_validation_loss < 0.97 * baseline


@pytest.mark.slow
def test_history_files_are_written(trained):
    rows = list(csv.DictReader(open(trained.output_dir / "history.csv", encoding="utf-8")))
    assert [int(row["epoch"]) for row in rows] == list(range(TEST_CONFIG["epochs"] + 1))
    summary = json.loads((trained.output_dir / "history.json").read_text(encoding="utf-8"))
    assert summary["best_epoch"] == trained.best_epoch
    assert summary["config"]["loss"] == "dhn-nce"
    split = json.loads((trained.output_dir / "split.json").read_text(encoding="utf-8"))
    assert len(split["validation_lines"]) == trained.validation_pairs


@pytest.mark.slow
def test_saved_model_loads_with_open_clip(trained):
    import open_clip

    folder = trained.model_dir
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "config.json"):
        assert (folder / name).is_file(), name
    model, _ = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        features = model.encode_text(tokenizer(list(CAPTIONS.values())), normalize=True)
    assert features.shape == (3, 512)
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    assert config["medclipsam_finetune"]["epoch"] == trained.best_epoch


@pytest.mark.slow
def test_saved_model_is_best_epoch(trained, caption_csv):
    from MedCLIPSAMLib.finetune.retrieval import embed_pairs
    from MedCLIPSAMLib.models import load_clip

    clip = load_clip(f"local-dir:{trained.model_dir}", device="cpu")
    pairs = read_caption_csv(caption_csv).pairs
    _, validation = split_pairs(pairs, validation_fraction=TEST_CONFIG["validation_fraction"], seed=0)
    image_features, text_features = embed_pairs(clip, validation)
    recomputed = validation_loss(ContrastiveLoss("dhn-nce"), image_features, text_features, TEST_CONFIG["batch_size"])
    assert recomputed == pytest.approx(trained.best_validation_loss, rel=1e-4)


@pytest.mark.slow
def test_finetune_raises_retrieval_above_chance(trained, caption_csv, tiny_clip_id):
    from MedCLIPSAMLib.finetune.retrieval import evaluate_retrieval
    from MedCLIPSAMLib.models import load_clip

    pairs = read_caption_csv(caption_csv).pairs
    tuned = evaluate_retrieval(load_clip(f"local-dir:{trained.model_dir}", device="cpu"), pairs, runs=1)
    start = evaluate_retrieval(load_clip(tiny_clip_id, device="cpu"), pairs, runs=1)
    # Averaged over both directions: with 3 distinct captions, text->image alone has only 3 distinct queries.
    tuned_top1 = (tuned.mean["image_to_text_top1"] + tuned.mean["text_to_image_top1"]) / 2
    start_top1 = (start.mean["image_to_text_top1"] + start.mean["text_to_image_top1"]) / 2
    assert tuned_top1 > tuned.chance["top1"] + 0.1
    assert tuned_top1 > start_top1


@pytest.mark.slow
def test_saved_model_runs_in_segment(trained, shared_data, tiny_sam_checkpoint, tmp_path):
    from MedCLIPSAMLib.cli import main

    image = sorted((shared_data / "breast_ultrasound" / "images").iterdir())[0]
    code = main(
        [
            "segment", str(image), "--prompt", "breast tumor", "--clip", f"local-dir:{trained.model_dir}",
            "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint), "--top-k", "4",
            "--device", "cpu", "--output", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    assert any(tmp_path.glob("*_mask.png"))


def _small_config(**changes) -> FinetuneConfig:
    settings = dict(learning_rate=1e-3, epochs=2, batch_size=4, validation_fraction=0.34, seed=3)
    settings.update(changes)
    return FinetuneConfig(**settings)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(shared_data, tiny_clip_id, tmp_path):
    from safetensors.torch import load_file

    csv_path = build_caption_set(shared_data, tmp_path / "data", per_category=3)
    straight = finetune_clip(
        csv_path, tmp_path / "straight", clip_id=tiny_clip_id, config=_small_config(), device="cpu"
    )
    finetune_clip(csv_path, tmp_path / "split", clip_id=tiny_clip_id, config=_small_config(epochs=1), device="cpu")
    resumed = finetune_clip(
        csv_path,
        tmp_path / "split",
        clip_id=tiny_clip_id,
        config=_small_config(),
        device="cpu",
        resume=tmp_path / "split" / "checkpoint.pt",
    )
    assert [record.epoch for record in resumed.history] == [0, 1, 2]
    assert resumed.history[2].learning_rate == pytest.approx(0.5e-3)
    assert resumed.history[2].validation_loss == pytest.approx(straight.history[2].validation_loss, rel=1e-5)
    straight_state = torch.load(straight.checkpoint_path, weights_only=True)["model"]
    resumed_state = torch.load(resumed.checkpoint_path, weights_only=True)["model"]
    for name, tensor in straight_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert load_file(str(resumed.model_dir / "open_clip_model.safetensors")).keys() == straight_state.keys()


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(shared_data, tiny_clip_id, tmp_path):
    csv_path = build_caption_set(shared_data, tmp_path / "data", per_category=3)
    finetune_clip(csv_path, tmp_path / "run", clip_id=tiny_clip_id, config=_small_config(epochs=1), device="cpu")
    with pytest.raises(InvalidInputError, match="--resume"):
        finetune_clip(csv_path, tmp_path / "run", clip_id=tiny_clip_id, config=_small_config(epochs=1), device="cpu")


@pytest.mark.slow
def test_cancel_stops_training(shared_data, tiny_clip_id, tmp_path):
    csv_path = build_caption_set(shared_data, tmp_path / "data", per_category=3)
    with pytest.raises(CancelledError):
        finetune_clip(
            csv_path, tmp_path / "run", clip_id=tiny_clip_id, config=_small_config(), device="cpu", cancel=lambda: True
        )


def test_invalid_settings_are_rejected():
    with pytest.raises(InvalidInputError, match="batch size"):
        FinetuneConfig(batch_size=1).validate()
    with pytest.raises(InvalidInputError, match="Unknown loss"):
        FinetuneConfig(loss="triplet").validate()
    with pytest.raises(InvalidInputError, match="lr_decay"):
        FinetuneConfig(lr_decay=0.0).validate()


@pytest.mark.slow
def test_cli_finetune(shared_data, tiny_clip_id, tmp_path, capsys):
    from MedCLIPSAMLib.cli import main

    csv_path = build_caption_set(shared_data, tmp_path / "data", per_category=3)
    output = tmp_path / "run"
    arguments = [
        "finetune", "--data", str(csv_path), "--output", str(output), "--clip", tiny_clip_id, "--epochs", "1",
        "--batch-size", "4", "--lr", "1e-3", "--loss", "hn-nce", "--device", "cpu", "--workers", "0",
    ]  # fmt: skip
    assert main(arguments) == 0
    assert "best epoch 1" in capsys.readouterr().out
    assert (output / "model" / "open_clip_model.safetensors").is_file()
    assert main(arguments[:-2] + ["--workers", "0", "--batch-size", "1"]) == 2

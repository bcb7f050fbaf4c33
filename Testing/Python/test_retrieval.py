"""Retrieval accuracy: hits per batch, caption-identity matches, chance level, run statistics, table and CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.finetune.data import ImageCaptionPair
from MedCLIPSAMLib.finetune.retrieval import evaluate_retrieval, retrieval_hits, retrieval_table


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_hits_of_aligned_embeddings():
    features = F.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    hits = retrieval_hits(features, features.clone())
    for name in ("image_to_text_top1", "text_to_image_top1", "image_to_text_top2", "text_to_image_top2"):
        assert hits[name].all(), name


def test_hits_of_known_ranking():
    # Image 0 is closest to text 1 and second closest to text 0; image 1 is closest to its own text.
    images = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = _unit([[0.8, 0.0, 0.6], [0.9, 0.44, 0.0], [0.0, 0.0, 1.0]])
    hits = retrieval_hits(images, texts)
    assert hits["image_to_text_top1"].tolist() == [False, True, True]
    assert hits["image_to_text_top2"].tolist() == [True, True, True]
    # Text 0 is closest to image 0; text 1 to image 0 (wrong), then image 1.
    assert hits["text_to_image_top1"].tolist() == [True, False, True]
    assert hits["text_to_image_top2"].tolist() == [True, True, True]


def test_identical_captions_count_as_matches():
    images = _unit([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    texts = _unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Texts 0 and 1 are the same caption: image 1 retrieving text 0 is correct.
    grouped = retrieval_hits(images, texts, caption_ids=torch.tensor([0, 0, 1]))
    assert grouped["image_to_text_top1"].all()
    strict = retrieval_hits(images, texts)
    assert not bool(strict["image_to_text_top1"][1])


def test_chance_level_with_unique_and_shared_captions():
    features = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    unique = retrieval_hits(features, features)
    assert unique["chance_top1"].tolist() == pytest.approx([1 / 8] * 8)
    assert unique["chance_top2"].tolist() == pytest.approx([2 / 8] * 8)
    shared = retrieval_hits(features, features, caption_ids=torch.tensor([0, 0, 1, 1, 1, 1, 2, 3]))
    # Two correct items among 8: top-1 2/8; top-2 1 - C(6,2)/C(8,2) = 13/28.
    assert shared["chance_top1"][0].item() == pytest.approx(2 / 8)
    assert shared["chance_top2"][0].item() == pytest.approx(13 / 28)


def _pairs(count: int) -> list[ImageCaptionPair]:
    return [
        ImageCaptionPair(Path(f"/data/{index}.png"), f"caption number {index}", index + 2) for index in range(count)
    ]


def _noisy_features(count: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(count, 32, generator=generator), dim=1)
    texts = F.normalize(images + noise * torch.randn(count, 32, generator=generator), dim=1)
    return images, texts


def test_runs_use_batches_of_fifty():
    features = _noisy_features(120, noise=0.6)
    result = evaluate_retrieval(None, _pairs(120), features=features, model_label="noisy", runs=5, seed=3)
    assert result.batch_pairs == 50
    assert len(result.per_run) == 5
    values = [run["image_to_text_top1"] for run in result.per_run]
    # 2 batches of 50 per run: accuracies are multiples of 1/100, and the runs differ.
    for value in values:
        assert value * 100 == pytest.approx(round(value * 100))
    assert len(set(values)) > 1
    assert result.mean["image_to_text_top1"] == pytest.approx(np.mean(values))
    assert result.std["image_to_text_top1"] == pytest.approx(np.std(values, ddof=1))
    assert result.chance["top1"] == pytest.approx(1 / 50)


def test_runs_are_reproducible_and_better_than_chance():
    features = _noisy_features(60, noise=0.3)
    first = evaluate_retrieval(None, _pairs(60), features=features, model_label="a", seed=4)
    second = evaluate_retrieval(None, _pairs(60), features=features, model_label="a", seed=4)
    assert first.per_run == second.per_run
    assert first.mean["text_to_image_top2"] >= first.mean["text_to_image_top1"]
    assert first.mean["image_to_text_top1"] > 5 * first.chance["top1"]


def test_small_set_is_one_batch():
    result = evaluate_retrieval(None, _pairs(12), features=_noisy_features(12, 0.1), model_label="small")
    assert result.batch_pairs == 12
    assert result.chance["top1"] == pytest.approx(1 / 12)


def test_invalid_arguments_are_rejected():
    with pytest.raises(InvalidInputError, match="at least 2"):
        evaluate_retrieval(None, _pairs(1), features=_noisy_features(1, 0.1))
    with pytest.raises(InvalidInputError, match="batch_pairs"):
        evaluate_retrieval(None, _pairs(4), features=_noisy_features(4, 0.1), batch_pairs=1)


def test_table_has_one_row_per_model():
    features = _noisy_features(60, noise=0.3)
    results = [
        evaluate_retrieval(None, _pairs(60), features=features, model_label=label, runs=2) for label in ("pre", "tuned")
    ]
    lines = retrieval_table(results).splitlines()
    assert lines[0].startswith("| Model | I->T top-1 | I->T top-2 | T->I top-1 | T->I top-2 |")
    assert lines[2].startswith("| pre | ")
    assert lines[3].startswith("| tuned | ")
    assert lines[4].startswith("| chance (random ranking) | 2.0 | 4.0 | 2.0 | 4.0 |")
    assert " +- " in lines[2]


def _caption_csv(shared_data: Path, folder: Path) -> Path:
    rows = []
    for category, caption in (
        ("breast_ultrasound", "breast ultrasound image showing a tumor"),
        ("brain_mri", "brain mri slice showing a tumor"),
        ("chest_xray", "chest x ray radiograph of the lungs"),
    ):
        for path in sorted((shared_data / category / "images").iterdir())[:3]:
            rows.append((str(path), caption))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return folder / "pairs.csv"


@pytest.fixture
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_cli_retrieval_compares_models(shared_data, tiny_clip_id, tmp_path, capsys):
    from MedCLIPSAMLib.cli import main
    from MedCLIPSAMLib.tiny import build_tiny_biomedclip

    other = build_tiny_biomedclip(tmp_path / "other_model", seed=1)
    csv_path = _caption_csv(shared_data, tmp_path / "data")
    table_path = tmp_path / "table.md"
    code = main(
        [
            "retrieval", "--data", str(csv_path), "--model", tiny_clip_id, "--model", str(other),
            "--device", "cpu", "--runs", "3", "--output", str(table_path),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"| {tiny_clip_id} | " in printed
    assert f"| {other} | " in printed
    assert table_path.read_text(encoding="utf-8").strip() == printed.strip()
    numbers = json.loads(table_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert [entry["pairs"] for entry in numbers] == [9, 9]


def test_cli_retrieval_rejects_json_output(tmp_path):
    from MedCLIPSAMLib.cli import main

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,caption\n", encoding="utf-8")
    assert main(["retrieval", "--data", str(csv_path), "--model", "x", "--output", str(tmp_path / "t.json")]) == 2

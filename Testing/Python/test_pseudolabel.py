"""Pseudo-labelling a data set with the tiny models: outputs, resuming, rank split, failures, command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from MedCLIPSAMLib.cli import main as cli_main
from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.models import load_clip, load_sam
from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter
from MedCLIPSAMLib.weak.pseudolabel import (
    is_finished,
    pseudo_label_dataset,
    rank_from_environment,
    shard_for_rank,
)

IMAGE_COUNT = 5
PROMPT = "lung opacity"


class CountingSegmenter:
    """Forward `segment` to the zero-shot pipeline and record the image shape of every call."""

    def __init__(self, inner: ZeroShotSegmenter) -> None:
        self.inner = inner
        self.calls: list[tuple[int, ...]] = []

    def segment(self, image, prompt):
        self.calls.append(tuple(image.shape))
        return self.inner.segment(image, prompt)


@pytest.fixture(scope="module")
def zero_shot(tiny_clip_id, tiny_sam_checkpoint) -> ZeroShotSegmenter:
    clip = load_clip(tiny_clip_id, device="cpu")
    sam_model = load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")
    return ZeroShotSegmenter(clip, sam_model, ZeroShotConfig(top_k=4))


@pytest.fixture()
def image_dir(tmp_path, shared_data) -> Path:
    """Five small chest X-ray crops (different sizes), named out of sorted order on purpose."""
    source = sorted((shared_data / "chest_xray" / "images").iterdir())[0]
    with Image.open(source) as opened:
        gray = np.array(opened.convert("L"))
    folder = tmp_path / "images"
    folder.mkdir()
    for index, name in enumerate(["e", "b", "d", "a", "c"]):
        crop = gray[index * 20 : index * 20 + 64 + 4 * index, index * 10 : index * 10 + 72]
        Image.fromarray(crop).save(folder / f"{name}.png")
    return folder


def test_outputs_written(zero_shot, image_dir, tmp_path):
    segmenter = CountingSegmenter(zero_shot)
    output = tmp_path / "pseudo"
    summary = pseudo_label_dataset(segmenter, image_dir, PROMPT, output, rank=0, world_size=1, save_saliency=True)
    assert summary.assigned == IMAGE_COUNT
    assert sorted(summary.labelled) == sorted(path.name for path in image_dir.iterdir())
    assert summary.failed == {}
    assert len(segmenter.calls) == IMAGE_COUNT
    for image_path in sorted(image_dir.iterdir()):
        mask_path = output / "masks" / image_path.name
        mask = np.asarray(Image.open(mask_path))
        with Image.open(image_path) as image:
            assert mask.shape == (image.height, image.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert (output / "saliency" / image_path.name).is_file()
        record = json.loads((output / "records" / f"{image_path.stem}.json").read_text())
        assert record["prompt"] == PROMPT
        assert record["image"] == image_path.name
        assert record["mask_pixels"] == int((mask > 0).sum())
        assert is_finished(output, image_path, PROMPT)
    leftovers = [path for path in output.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


def test_second_run_skips_finished(zero_shot, image_dir, tmp_path):
    output = tmp_path / "pseudo"
    first = CountingSegmenter(zero_shot)
    pseudo_label_dataset(first, image_dir, PROMPT, output, rank=0, world_size=1)
    assert len(first.calls) == IMAGE_COUNT

    second = CountingSegmenter(zero_shot)
    summary = pseudo_label_dataset(second, image_dir, PROMPT, output, rank=0, world_size=1)
    assert second.calls == []
    assert len(summary.skipped) == IMAGE_COUNT
    assert summary.labelled == []


def test_interrupted_image_redone(zero_shot, image_dir, tmp_path):
    output = tmp_path / "pseudo"
    pseudo_label_dataset(CountingSegmenter(zero_shot), image_dir, PROMPT, output, rank=0, world_size=1)
    # A run killed after the mask but before the record leaves no record: that image is not finished.
    (output / "records" / "c.json").unlink()
    # A killed write leaves a temporary file and a truncated record: neither counts.
    (output / "masks" / ".d.png.123.tmp").write_bytes(b"partial")
    (output / "records" / "d.json").write_text('{"prompt": "lung')

    segmenter = CountingSegmenter(zero_shot)
    summary = pseudo_label_dataset(segmenter, image_dir, PROMPT, output, rank=0, world_size=1)
    assert sorted(summary.labelled) == ["c.png", "d.png"]
    assert len(segmenter.calls) == 2
    assert is_finished(output, image_dir / "c.png", PROMPT)


def test_other_prompt_relabels(zero_shot, image_dir, tmp_path):
    output = tmp_path / "pseudo"
    pseudo_label_dataset(CountingSegmenter(zero_shot), image_dir, PROMPT, output, rank=0, world_size=1)
    segmenter = CountingSegmenter(zero_shot)
    summary = pseudo_label_dataset(segmenter, image_dir, "left lung", output, rank=0, world_size=1)
    assert len(segmenter.calls) == IMAGE_COUNT
    assert len(summary.labelled) == IMAGE_COUNT


def test_two_ranks_cover_each_image_once(zero_shot, image_dir, tmp_path):
    output = tmp_path / "pseudo"
    labelled = []
    calls = 0
    for rank in (0, 1):
        segmenter = CountingSegmenter(zero_shot)
        summary = pseudo_label_dataset(segmenter, image_dir, PROMPT, output, rank=rank, world_size=2)
        labelled.extend(summary.labelled)
        calls += len(segmenter.calls)
    names = sorted(path.name for path in image_dir.iterdir())
    assert sorted(labelled) == names
    assert len(labelled) == len(set(labelled))
    assert calls == IMAGE_COUNT
    assert sorted((output / "masks").iterdir()) == sorted(output / "masks" / name for name in names)


def test_shard_for_rank_positions():
    items = list("abcdefg")
    assert shard_for_rank(items, 0, 3) == ["a", "d", "g"]
    assert shard_for_rank(items, 2, 3) == ["c", "f"]
    assert shard_for_rank(items, 0, 1) == items
    with pytest.raises(InvalidInputError, match="rank"):
        shard_for_rank(items, 3, 3)
    with pytest.raises(InvalidInputError, match="world_size"):
        shard_for_rank(items, 0, 0)


def test_rank_from_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_from_environment() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_from_environment() == (1, 4)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InvalidInputError, match="RANK"):
        rank_from_environment()


def test_unreadable_image_listed_as_failed(zero_shot, image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"not a png")
    output = tmp_path / "pseudo"
    summary = pseudo_label_dataset(CountingSegmenter(zero_shot), image_dir, PROMPT, output, rank=0, world_size=1)
    assert list(summary.failed) == ["broken.png"]
    assert len(summary.labelled) == IMAGE_COUNT
    assert not is_finished(output, image_dir / "broken.png", PROMPT)


def test_empty_prompt_rejected(zero_shot, image_dir, tmp_path):
    with pytest.raises(InvalidInputError, match="prompt"):
        pseudo_label_dataset(CountingSegmenter(zero_shot), image_dir, "  ", tmp_path / "out", rank=0, world_size=1)


def test_cli_ranks_from_environment(image_dir, tmp_path, tiny_clip_id, tiny_sam_checkpoint, monkeypatch, capsys):
    output = tmp_path / "pseudo"
    arguments = [
        "pseudo-label", "--images", str(image_dir), "--prompt", PROMPT, "--output", str(output),
        "--clip", tiny_clip_id, "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
        "--device", "cpu", "--top-k", "4",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert cli_main(arguments) == 0
    records = [json.loads(path.read_text()) for path in sorted((output / "records").glob("*.json"))]
    assert sorted(record["image"] for record in records) == sorted(path.name for path in image_dir.iterdir())
    ranks_by_image = {record["image"]: record["rank"] for record in records}
    sorted_names = sorted(path.name for path in image_dir.iterdir())
    for position, name in enumerate(sorted_names):
        assert ranks_by_image[name] == position % 2, name
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli_main(arguments) == 0
    assert f"0 labelled (0 with the target), {IMAGE_COUNT} already done" in capsys.readouterr().err

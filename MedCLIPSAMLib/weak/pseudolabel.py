"""Zero-shot pseudo-labels for a whole data set: resumable and split across ranks.

`pseudo_label_dataset` runs a segmenter (normally `ZeroShotSegmenter`) on every image of a folder and writes,
per image with stem ``<stem>``:

* ``masks/<stem>.png``: the mask, 8-bit, 0 background and 255 foreground, at the image's size (an empty mask when
  the target was not found, so that the network learns "absent" too);
* ``saliency/<stem>.png``: the saliency map scaled to 0-255 (only with ``save_saliency=True``);
* ``records/<stem>.json``: prompt, found flag, CLIP score, boxes, seconds per stage, rank.

Resuming: an image counts as finished when both its mask and its record exist and the record's prompt is the
current prompt, and finished images are skipped. Every file is written to a temporary name and renamed, and the
record is written last, so a killed run leaves either a finished image or one that the next run redoes.

Splitting: with ``world_size`` ranks (default: the RANK and WORLD_SIZE environment variables that torchrun sets),
rank r takes the images at positions i of the sorted file list with i % world_size == r. Ranks share nothing but
the output folder, so they can run on several GPUs or machines without a process group.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError
from MedCLIPSAMLib.weak.data import file_stem, list_image_files

logger = logging.getLogger(__name__)

__all__ = [
    "MASKS_FOLDER",
    "RECORDS_FOLDER",
    "SALIENCY_FOLDER",
    "PseudoLabelSummary",
    "is_finished",
    "pseudo_label_dataset",
    "rank_from_environment",
    "shard_for_rank",
]

MASKS_FOLDER = "masks"
RECORDS_FOLDER = "records"
SALIENCY_FOLDER = "saliency"

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]
Item = TypeVar("Item")


@dataclass
class PseudoLabelSummary:
    """Counts of one `pseudo_label_dataset` run on one rank."""

    rank: int
    world_size: int
    assigned: int
    """Images of this rank's shard."""
    labelled: list[str] = field(default_factory=list)
    """Image file names segmented in this run."""
    skipped: list[str] = field(default_factory=list)
    """Image file names already finished by an earlier run."""
    failed: dict[str, str] = field(default_factory=dict)
    """Image file name -> error message, for images that could not be read or segmented."""
    found: int = 0
    """Images of this run whose mask is not empty."""
    cancelled: bool = False


def rank_from_environment() -> tuple[int, int]:
    """Return (rank, world_size) from the RANK and WORLD_SIZE environment variables; (0, 1) when unset."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1)):
        raw = os.environ.get(name, "")
        try:
            values[name] = int(raw) if raw.strip() else default
        except ValueError:
            raise InvalidInputError(f"Environment variable {name} must be an integer, got {raw!r}.") from None
    return values["RANK"], values["WORLD_SIZE"]


def shard_for_rank(items: Sequence[Item], rank: int, world_size: int) -> list[Item]:
    """Return the items at positions i with i % world_size == rank (in their order).

    Raises InvalidInputError unless world_size >= 1 and 0 <= rank < world_size.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidInputError(f"world_size must be a positive int, got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidInputError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    return [item for position, item in enumerate(items) if position % world_size == rank]


def _output_paths(output_dir: Path, stem: str) -> dict[str, Path]:
    return {
        "mask": output_dir / MASKS_FOLDER / f"{stem}.png",
        "saliency": output_dir / SALIENCY_FOLDER / f"{stem}.png",
        "record": output_dir / RECORDS_FOLDER / f"{stem}.json",
    }


def is_finished(output_dir: str | Path, image_path: str | Path, prompt: str) -> bool:
    """Return True when `image_path` has a mask and a readable record for `prompt` under `output_dir`."""
    paths = _output_paths(Path(output_dir), file_stem(image_path))
    if not paths["mask"].is_file() or not paths["record"].is_file():
        return False
    try:
        record = json.loads(paths["record"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("prompt") == prompt


def _write_png_atomic(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.ascontiguousarray(image)).save(temporary, format="PNG")
    os.replace(temporary, path)


def _write_json_atomic(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _label_one(segmenter, image_path: Path, prompt: str, paths: dict[str, Path], save_saliency: bool,
               rank: int, world_size: int) -> bool:
    """Segment one image, write its outputs (record last) and return whether the target was found."""
    from MedCLIPSAMLib.io import read_image

    image = read_image(image_path)
    result = segmenter.segment(image, prompt)
    mask = np.asarray(result.mask, dtype=bool)
    _write_png_atomic(paths["mask"], mask.astype(np.uint8) * 255)
    if save_saliency:
        saliency = np.clip(np.asarray(result.saliency, dtype=np.float32), 0.0, 1.0)
        _write_png_atomic(paths["saliency"], np.rint(saliency * 255.0).astype(np.uint8))
    record = {
        "image": image_path.name,
        "prompt": prompt,
        "found": bool(result.found),
        "clip_score": float(result.clip_score),
        "boxes": np.asarray(result.boxes, dtype=np.int64).reshape(-1, 4).tolist(),
        "box_format": "XYXY pixel coordinates, inclusive maxima",
        "mask_pixels": int(mask.sum()),
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "seconds": {stage: round(float(value), 4) for stage, value in result.timings.items()},
        "rank": rank,
        "world_size": world_size,
    }
    _write_json_atomic(paths["record"], record)
    return bool(result.found)


def pseudo_label_dataset(
    segmenter,
    images_dir: str | Path,
    prompt: str,
    output_dir: str | Path,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    save_saliency: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> PseudoLabelSummary:
    """Write zero-shot masks for this rank's share of the images in `images_dir` (see the module docstring).

    Args:
        segmenter: object with ``segment(image, prompt)`` returning a `SegmentationResult` (mask bool [H, W],
            saliency float32 [H, W] in [0, 1], found, clip_score, boxes, timings), e.g. `ZeroShotSegmenter`.
        images_dir: folder of images (`list_image_files`: sorted by name, hidden files skipped).
        prompt: text naming the target.
        output_dir: folder for masks/, records/ and saliency/ (created).
        rank, world_size: this process's share; None reads RANK and WORLD_SIZE from the environment.
        save_saliency: also write the saliency maps as PNG.
        progress: called as progress(done, total, message) after each image of the shard.
        cancel: polled before each image; True stops the run (finished images stay finished).

    Returns:
        PseudoLabelSummary. Images that fail with a MedCLIPSAMError (unreadable, too small, constant) are listed
        in `failed` and left unfinished, so a later run retries them. Other errors propagate.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"The text prompt must be a non-empty string, got {prompt!r}.")
    prompt = prompt.strip()
    if rank is None or world_size is None:
        environment_rank, environment_world = rank_from_environment()
        rank = environment_rank if rank is None else rank
        world_size = environment_world if world_size is None else world_size
    output_dir = Path(output_dir)
    shard = shard_for_rank(list_image_files(images_dir), rank, world_size)
    summary = PseudoLabelSummary(rank=rank, world_size=world_size, assigned=len(shard))
    logger.info("Rank %d of %d: %d of the images in %s", rank, world_size, len(shard), images_dir)

    for done, image_path in enumerate(shard, start=1):
        if cancel is not None and cancel():
            summary.cancelled = True
            logger.info("Pseudo-labelling cancelled after %d of %d images.", done - 1, len(shard))
            break
        if is_finished(output_dir, image_path, prompt):
            summary.skipped.append(image_path.name)
            status = "already done"
        else:
            paths = _output_paths(output_dir, file_stem(image_path))
            try:
                found = _label_one(segmenter, image_path, prompt, paths, save_saliency, rank, world_size)
            except MedCLIPSAMError as error:
                logger.error("Pseudo-labelling %s failed: %s", image_path, error)
                summary.failed[image_path.name] = str(error)
                status = f"failed: {error}"
            else:
                summary.labelled.append(image_path.name)
                summary.found += int(found)
                status = "found" if found else "not found (empty mask)"
        if progress is not None:
            progress(done, len(shard), f"{image_path.name}: {status}")
    return summary

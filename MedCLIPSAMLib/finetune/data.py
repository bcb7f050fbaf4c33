"""Image-caption pairs for fine-tuning: CSV reading, caption cleaning, the seeded train/validation split, a Dataset.

The CSV has one row per image with a header row. The image column contains a file path, absolute or relative to the
CSV's folder; the caption column contains free text. Captions are cleaned as in the MedCLIP-SAM paper: special
characters removed, whitespace collapsed and stripped, and captions shorter than 20 characters dropped.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = [
    "DEFAULT_MIN_CAPTION_LENGTH",
    "DEFAULT_VALIDATION_FRACTION",
    "IMAGE_COLUMN_NAMES",
    "CAPTION_COLUMN_NAMES",
    "CaptionTable",
    "ImageCaptionDataset",
    "ImageCaptionPair",
    "build_preprocess",
    "clean_caption",
    "fingerprint_pairs",
    "load_rgb_image",
    "read_caption_csv",
    "split_pairs",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_CAPTION_LENGTH = 20
"""Captions shorter than this many characters after cleaning are dropped (MedCLIP-SAM paper)."""

DEFAULT_VALIDATION_FRACTION = 0.15
"""Share of the pairs held out for validation (the MedCLIP-SAM paper's 85/15 split)."""

IMAGE_COLUMN_NAMES = ("image", "filename", "image_path", "path", "file", "img")
"""Header names tried, in order and case-insensitively, for the image column when none is given."""

CAPTION_COLUMN_NAMES = ("caption", "text", "report", "description")
"""Header names tried, in order and case-insensitively, for the caption column when none is given."""

# Characters kept in a caption besides letters, digits and whitespace: sentence punctuation and the symbols of
# measurements and ranges. Everything else (#, *, @, <, >, |, _, ~, brackets, emoji, control characters) becomes
# a space.
_KEPT_PUNCTUATION = frozenset(".,;:!?'\"()-/%+")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ImageCaptionPair:
    """One usable CSV row: the resolved image file, its cleaned caption and the row's 1-based line in the CSV."""

    image_path: Path
    caption: str
    line: int


@dataclass(frozen=True)
class CaptionTable:
    """Pairs read from a caption CSV, with the counts of the cleaning step."""

    pairs: list[ImageCaptionPair]
    rows_read: int
    dropped_short: int
    image_column: str
    caption_column: str


def clean_caption(text: str) -> str:
    """Remove special characters (they become spaces), collapse runs of whitespace and strip both ends.

    Letters and digits of any script are kept, as are the characters ``. , ; : ! ? ' " ( ) - / % +``.
    """
    characters = [
        character if character.isalnum() or character.isspace() or character in _KEPT_PUNCTUATION else " "
        for character in text
    ]
    return _WHITESPACE.sub(" ", "".join(characters)).strip()


def _pick_column(
    fieldnames: Sequence[str], requested: str | None, candidates: Sequence[str], role: str, csv_path
) -> str:
    by_lower = {name.strip().lower(): name for name in fieldnames}
    if requested is not None:
        if requested in fieldnames:
            return requested
        if requested.strip().lower() in by_lower:
            return by_lower[requested.strip().lower()]
        raise InvalidInputError(
            f"Column {requested!r} for the {role} is not in the header of {csv_path} "
            f"(columns: {', '.join(fieldnames)}); pass one of those."
        )
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    raise InvalidInputError(
        f"No {role} column found in {csv_path} (columns: {', '.join(fieldnames)}, looked for: "
        f"{', '.join(candidates)}); name it with --{role}-column."
    )


def read_caption_csv(
    csv_path: str | Path,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    min_caption_length: int = DEFAULT_MIN_CAPTION_LENGTH,
) -> CaptionTable:
    """Read image-caption pairs from a CSV file and clean the captions.

    The delimiter (comma, tab or semicolon) is detected from the header line. Relative image paths are resolved
    against the CSV's folder. Rows whose cleaned caption is shorter than `min_caption_length` characters are
    dropped and counted; the count is logged.

    Args:
        csv_path: CSV file with a header row.
        image_column: Header of the image path column; default: the first of `IMAGE_COLUMN_NAMES` present.
        caption_column: Header of the caption column; default: the first of `CAPTION_COLUMN_NAMES` present.
        min_caption_length: Minimum cleaned caption length in characters, >= 0.

    Raises:
        InvalidInputError: the file is missing or empty, a column is missing, an image file does not exist,
            or no pair is left after cleaning.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise InvalidInputError(f"Caption CSV not found: {csv_path}; pass a CSV file with image and caption columns.")
    if min_caption_length < 0:
        raise InvalidInputError(f"min_caption_length must be >= 0, got {min_caption_length}.")
    base = csv_path.resolve().parent

    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        delimiter = max(",\t;", key=header.count) if header.strip() else ","
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise InvalidInputError(f"Caption CSV {csv_path} is empty; it needs a header row and one row per image.")
        fieldnames = list(reader.fieldnames)
        image_key = _pick_column(fieldnames, image_column, IMAGE_COLUMN_NAMES, "image", csv_path)
        caption_key = _pick_column(fieldnames, caption_column, CAPTION_COLUMN_NAMES, "caption", csv_path)

        pairs: list[ImageCaptionPair] = []
        missing: list[str] = []
        rows_read = 0
        dropped_short = 0
        for row in reader:
            rows_read += 1
            line = reader.line_num
            image_value = (row.get(image_key) or "").strip()
            caption = clean_caption(row.get(caption_key) or "")
            if len(caption) < min_caption_length:
                dropped_short += 1
                continue
            if not image_value:
                missing.append(f"line {line}: empty image path")
                continue
            image_path = Path(image_value).expanduser()
            if not image_path.is_absolute():
                image_path = base / image_path
            if not image_path.is_file():
                missing.append(f"line {line}: {image_path}")
                continue
            pairs.append(ImageCaptionPair(image_path=image_path, caption=caption, line=line))

    if missing:
        shown = "; ".join(missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInputError(
            f"{len(missing)} image file(s) listed in {csv_path} were not found ({shown}{more}); fix the paths "
            "(relative paths are resolved against the CSV's folder) or remove those rows."
        )
    logger.info(
        "Read %d rows from %s: %d pairs kept, %d dropped with captions under %d characters",
        rows_read,
        csv_path,
        len(pairs),
        dropped_short,
        min_caption_length,
    )
    if not pairs:
        raise InvalidInputError(
            f"No image-caption pair left in {csv_path} after cleaning ({rows_read} rows, {dropped_short} with "
            f"captions under {min_caption_length} characters)."
        )
    return CaptionTable(
        pairs=pairs,
        rows_read=rows_read,
        dropped_short=dropped_short,
        image_column=image_key,
        caption_column=caption_key,
    )


def split_pairs(
    pairs: Sequence[ImageCaptionPair],
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    min_pairs: int = 2,
) -> tuple[list[ImageCaptionPair], list[ImageCaptionPair]]:
    """Split pairs at random into training and validation lists, reproducibly for a given seed.

    The validation list gets ``round(validation_fraction * len(pairs))`` pairs, but at least `min_pairs`, and
    both lists keep the CSV order. The same pairs, fraction and seed always give the same split.

    Raises:
        InvalidInputError: the fraction is outside (0, 1) or a part would hold fewer than `min_pairs` pairs.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise InvalidInputError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    count = len(pairs)
    validation_count = max(min_pairs, int(round(validation_fraction * count)))
    if count - validation_count < min_pairs:
        raise InvalidInputError(
            f"{count} image-caption pairs are too few to split into training and validation sets of at least "
            f"{min_pairs} pairs each; provide at least {2 * min_pairs} pairs."
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    validation_indices = set(order[:validation_count])
    training = [pair for index, pair in enumerate(pairs) if index not in validation_indices]
    validation = [pair for index, pair in enumerate(pairs) if index in validation_indices]
    return training, validation


def fingerprint_pairs(pairs: Sequence[ImageCaptionPair]) -> str:
    """Return a SHA-256 hex digest of the image paths and captions, to check that a resumed run uses the same data."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(str(pair.image_path).encode("utf-8"))
        digest.update(b"\0")
        digest.update(pair.caption.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def load_rgb_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    8-bit files (gray, RGB, palette) are converted as stored; an alpha channel is dropped, not composited.
    Other bit depths (16-bit PNG, float TIFF) are windowed to 8 bits by `MedCLIPSAMLib.imaging.to_rgb_uint8`.

    Raises:
        InvalidInputError: the file cannot be read as an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA"):
                return image.convert("RGB")
            array = np.array(image)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Cannot read image {path}: {error}") from error

    from MedCLIPSAMLib.imaging import to_rgb_uint8

    return Image.fromarray(to_rgb_uint8(array))


def build_preprocess(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """Return open_clip's inference transform: bicubic resize of the short side, centre crop, tensor, normalise.

    This is the preprocessing that open_clip returns for BiomedCLIP. The transform maps an RGB PIL image to a
    [3, image_size, image_size] float32 tensor normalised with `mean` and `std`.
    """
    from open_clip.transform import image_transform

    return image_transform(image_size, is_train=False, mean=tuple(mean), std=tuple(std))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Dataset of (image tensor, caption tokens, index) triples.

    Item ``n`` is ``(image [3, S, S] float32 normalised, tokens [context_length] int64, n)`` where S is the
    transform's output size. Images are read on access, so DataLoader workers can decode in parallel.

    Args:
        pairs: Image-caption pairs (e.g. one part of `split_pairs`).
        preprocess: Callable from an RGB PIL image to a [3, S, S] tensor, e.g. `build_preprocess`.
        tokenizer: open_clip tokenizer, callable(list[str]) -> [N, context_length] int64.
    """

    def __init__(
        self,
        pairs: Sequence[ImageCaptionPair],
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
    ) -> None:
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pair = self.pairs[index]
        image = self.preprocess(load_rgb_image(pair.image_path))
        tokens = self.tokenizer([pair.caption])[0]
        return image, tokens, index

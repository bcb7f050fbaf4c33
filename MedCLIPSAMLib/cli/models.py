"""`medclipsam models download|list`: prepare an offline models folder and show what it contains."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..models import DEFAULT_CLIP_ID, default_models_dir, download_models, list_models

_DOWNLOADABLE_SAM_TYPES = ("vit_b", "vit_l", "vit_h")
_MODELS_DIR_HELP = "Models folder (default: $MEDCLIPSAM_MODELS_DIR, else ~/.cache/medclipsam)."


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="Download model weights for offline use, or list the models folder.",
        description="Prepare a self-contained models folder (BiomedCLIP and SAM checkpoints) that works with no "
        "network, and list what a models folder contains.",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")

    download = actions.add_parser(
        "download",
        help="Download BiomedCLIP and SAM checkpoints into the models folder.",
        description="Download BiomedCLIP (config, weights, tokenizer and text encoder config only) and official SAM "
        "checkpoints (SHA-256 verified). Copy the resulting folder to offline machines.",
    )
    download.add_argument("--models-dir", type=Path, default=None, help=_MODELS_DIR_HELP)
    download.add_argument(
        "--sam-type",
        nargs="+",
        choices=_DOWNLOADABLE_SAM_TYPES,
        default=["vit_b"],
        help="SAM checkpoints to download (default: vit_b). MedSAM has no public direct URL: place medsam_vit_b.pth "
        "in <models folder>/sam/ yourself.",
    )
    download.add_argument("--no-sam", action="store_true", help="Download no SAM checkpoint.")
    download.add_argument("--clip-id", default=DEFAULT_CLIP_ID, help="Hugging Face hub id of the CLIP model.")
    download.add_argument("--no-clip", action="store_true", help="Skip BiomedCLIP.")
    download.set_defaults(func=run_download)

    listing = actions.add_parser(
        "list",
        help="List the models in the models folder and verify their checksums.",
        description="Show which models are present, where, their size and whether their SHA-256 checksums match. "
        "Exit code 1 when a present file fails its checksum.",
    )
    listing.add_argument("--models-dir", type=Path, default=None, help=_MODELS_DIR_HELP)
    listing.add_argument("--no-verify", action="store_true", help="Skip hashing (faster for large checkpoints).")
    listing.set_defaults(func=run_list)

    parser.set_defaults(func=lambda args: _print_help(parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


class _TqdmProgress:
    """Progress callback that shows one tqdm bar per message (per downloaded file)."""

    def __init__(self) -> None:
        self._bar = None
        self._message = None

    def __call__(self, done: int, total: int, message: str) -> None:
        from tqdm import tqdm

        if message != self._message:
            self.close()
            unit_bytes = message.startswith("Downloading SAM")
            self._bar = tqdm(
                total=total or None, desc=message, unit="B" if unit_bytes else "file",
                unit_scale=unit_bytes, unit_divisor=1024, leave=True,
            )
            self._message = message
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_download(args) -> int:
    models_dir = args.models_dir or default_models_dir()
    sam_types = () if args.no_sam else tuple(dict.fromkeys(args.sam_type))
    progress = _TqdmProgress()
    try:
        prepared = download_models(
            models_dir, clip_id=None if args.no_clip else args.clip_id, sam_types=sam_types, progress=progress
        )
    except MedCLIPSAMError as error:
        progress.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    progress.close()
    for name, path in prepared.items():
        print(f"{name}: {path}")
    print(f"Models folder ready: {models_dir}")
    return 0


def _format_size(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _format_checksum(value: bool | None) -> str:
    return {True: "ok", False: "MISMATCH", None: "-"}[value]


def run_list(args) -> int:
    models_dir = args.models_dir or default_models_dir()
    try:
        entries = list_models(models_dir, verify=not args.no_verify)
    except (MedCLIPSAMError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"Models folder: {models_dir}")
    header = ("name", "kind", "present", "size", "checksum", "detail", "path")
    rows = [
        (
            entry["name"],
            entry["kind"],
            "yes" if entry["present"] else "no",
            _format_size(entry["size"]),
            _format_checksum(entry["checksum_ok"]),
            entry["detail"],
            str(entry["path"]),
        )
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 1 if any(entry["present"] and entry["checksum_ok"] is False for entry in entries) else 0

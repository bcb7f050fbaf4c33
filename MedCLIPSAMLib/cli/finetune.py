"""`medclipsam finetune` (DHN-NCE fine-tuning of BiomedCLIP) and `medclipsam retrieval` (top-k retrieval accuracy).

Exit codes of both: 0 on success, 1 when the run failed (unreadable data or model, training error, cancel),
2 for invalid arguments.

Distributed fine-tuning: start the same command under torchrun, for example
``python -m torch.distributed.run --nproc_per_node 4 -m MedCLIPSAMLib finetune --data pairs.csv --output run1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["add_parser", "run_finetune", "run_retrieval"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from MedCLIPSAMLib.finetune.data import DEFAULT_MIN_CAPTION_LENGTH, DEFAULT_VALIDATION_FRACTION

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="CSV",
        help="CSV with a header row, one image path (absolute or relative to the CSV's folder) and caption per row.",
    )
    data.add_argument(
        "--image-column", default=None, help="Header of the image path column (default: image, filename, path...)."
    )
    data.add_argument(
        "--caption-column", default=None, help="Header of the caption column (default: caption, text, report...)."
    )
    data.add_argument(
        "--min-caption-length",
        type=int,
        default=DEFAULT_MIN_CAPTION_LENGTH,
        help="Drop captions shorter than this many characters after cleaning (default: %(default)s).",
    )
    data.add_argument(
        "--validation-fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        help="Share of pairs held out for validation (default: %(default)s).",
    )
    data.add_argument(
        "--seed", type=int, default=0, help="Seed of the split, the shuffling and the retrieval batches (default: 0)."
    )


def add_parser(subparsers) -> None:
    """Register the ``finetune`` and ``retrieval`` subcommands on an argparse subparsers object."""
    from MedCLIPSAMLib.finetune.losses import LOSS_NAMES
    from MedCLIPSAMLib.finetune.retrieval import DEFAULT_BATCH_PAIRS, DEFAULT_RUNS
    from MedCLIPSAMLib.finetune.trainer import FinetuneConfig
    from MedCLIPSAMLib.models import DEFAULT_CLIP_ID

    defaults = FinetuneConfig()
    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune BiomedCLIP on image-caption pairs (DHN-NCE).",
        description=(
            "Fine-tune a BiomedCLIP model on the image-caption pairs of a CSV file with the DHN-NCE loss (or HN-NCE, "
            "DCL, InfoNCE), validating after every epoch on a seeded held-out split (--validation-fraction). "
            "Writes DIR/model (the epoch with the lowest validation loss, an open_clip local-dir folder for "
            "`medclipsam segment --clip`), DIR/checkpoint.pt (for --resume), DIR/history.csv and history.json. "
            "The learning rate is "
            "multiplied by --lr-decay every --lr-decay-epochs epochs. Run under torchrun for multi-process training; "
            "--batch-size is then the global batch."
        ),
    )
    _add_data_arguments(parser)
    parser.add_argument(
        "--output", "-o", required=True, type=Path, metavar="DIR", help="Output folder; created if missing."
    )
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP_ID,
        help="Model to start from: hf-hub: id, local-dir:/path or a folder (default: %(default)s).",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="Folder of downloaded weights (default: $MEDCLIPSAM_MODELS_DIR)."
    )
    parser.add_argument("--device", default="auto", help="Torch device: auto, cpu, cuda, cuda:N, mps (default: auto).")
    training = parser.add_argument_group("training")
    training.add_argument("--loss", choices=LOSS_NAMES, default=defaults.loss, help="Loss (default: %(default)s).")
    training.add_argument("--epochs", type=int, default=defaults.epochs, help="Epochs (default: %(default)s).")
    training.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="Global batch size in pairs (default: %(default)s)."
    )
    training.add_argument(
        "--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate (default: %(default)s)."
    )
    training.add_argument(
        "--lr-decay",
        type=float,
        default=defaults.lr_decay,
        help="Learning-rate factor applied every --lr-decay-epochs epochs (default: %(default)s, a 50 %% decay).",
    )
    training.add_argument(
        "--lr-decay-epochs", type=int, default=defaults.lr_decay_epochs, help="Epochs per decay step (default: 1)."
    )
    training.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)."
    )
    training.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="Loss temperature tau (default: %(default)s)."
    )
    training.add_argument(
        "--beta1",
        type=float,
        default=defaults.beta_image_to_text,
        help="Hard-negative hardness, image to text (default: %(default)s; dhn-nce and hn-nce only).",
    )
    training.add_argument(
        "--beta2",
        type=float,
        default=defaults.beta_text_to_image,
        help="Hard-negative hardness, text to image (default: %(default)s; dhn-nce and hn-nce only).",
    )
    training.add_argument(
        "--workers", type=int, default=4, help="Image-decoding worker processes per rank (default: %(default)s)."
    )
    training.add_argument("--resume", type=Path, default=None, help="checkpoint.pt of an earlier run to continue.")
    training.add_argument(
        "--overwrite", action="store_true", help="Start over in an output folder that already contains a run."
    )
    parser.set_defaults(func=run_finetune)

    retrieval = subparsers.add_parser(
        "retrieval",
        help="Top-1/top-2 image-text retrieval accuracy of one or more models.",
        description=(
            "Embed the pairs of a caption CSV with each --model, then measure image-to-text and text-to-image "
            "top-1 and top-2 accuracy in random batches of --batch-pairs pairs over --runs runs, and print one "
            "Markdown table (mean +- sample std in percent) with a row per model."
        ),
    )
    _add_data_arguments(retrieval)
    retrieval.add_argument(
        "--model",
        "-m",
        action="append",
        required=True,
        dest="models",
        metavar="MODEL",
        help="Model to evaluate (hf-hub: id, local-dir:/path or folder); repeat for several models.",
    )
    retrieval.add_argument(
        "--split",
        choices=("all", "train", "validation"),
        default="all",
        help="Pairs to evaluate: all, or one part of the seeded split that finetune uses (default: all).",
    )
    retrieval.add_argument(
        "--batch-pairs", type=int, default=DEFAULT_BATCH_PAIRS, help="Pairs per batch (default: %(default)s)."
    )
    retrieval.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="Runs (default: %(default)s).")
    retrieval.add_argument(
        "--models-dir", type=Path, default=None, help="Folder of downloaded weights (default: $MEDCLIPSAM_MODELS_DIR)."
    )
    retrieval.add_argument("--device", default="auto", help="Torch device (default: auto).")
    retrieval.add_argument("--workers", type=int, default=0, help="Image-decoding worker processes (default: 0).")
    retrieval.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="Also write the table to this file (.md) and the numbers next to it (.json).",
    )
    retrieval.set_defaults(func=run_retrieval)


def _progress_bar(description: str):
    """Return a tqdm bar on stderr and a ``progress(done, total, message)`` callback that drives it."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="step", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return bar, progress


def run_finetune(args: argparse.Namespace) -> int:
    """Run `medclipsam finetune` and return the exit code."""
    from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError
    from MedCLIPSAMLib.finetune.distributed import cleanup_distributed
    from MedCLIPSAMLib.finetune.trainer import FinetuneConfig, finetune_clip

    config = FinetuneConfig(
        loss=args.loss,
        temperature=args.temperature,
        beta_image_to_text=args.beta1,
        beta_text_to_image=args.beta2,
        learning_rate=args.lr,
        lr_decay=args.lr_decay,
        lr_decay_epochs=args.lr_decay_epochs,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        num_workers=args.workers,
        image_column=args.image_column,
        caption_column=args.caption_column,
        min_caption_length=args.min_caption_length,
    )
    try:
        config.validate()
    except InvalidInputError as error:
        print(f"medclipsam finetune: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        # Only rank 0 reports; the other ranks log warnings and errors only.
        logging.getLogger("MedCLIPSAMLib").setLevel(logging.WARNING)
    bar, progress = _progress_bar("finetune") if is_main else (None, None)
    try:
        result = finetune_clip(
            args.data,
            args.output,
            clip_id=args.clip,
            config=config,
            device=args.device,
            resume=args.resume,
            overwrite=args.overwrite,
            models_dir=args.models_dir,
            progress=progress,
        )
    except (MedCLIPSAMError, OSError) as error:
        logger.debug("Fine-tuning failed.", exc_info=True)
        print(f"medclipsam finetune: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if bar is not None:
            bar.close()
        cleanup_distributed()

    if is_main:
        for record in result.history:
            train = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
            print(f"epoch {record.epoch}: train loss {train}, validation loss {record.validation_loss:.4f}")
        print(
            f"best epoch {result.best_epoch} (validation loss {result.best_validation_loss:.4f}); model: "
            f"{result.model_dir} (use --clip local-dir:{result.model_dir})"
        )
    return EXIT_OK


def run_retrieval(args: argparse.Namespace) -> int:
    """Run `medclipsam retrieval` and return the exit code."""
    from dataclasses import asdict

    from MedCLIPSAMLib.errors import MedCLIPSAMError
    from MedCLIPSAMLib.finetune.data import read_caption_csv, split_pairs
    from MedCLIPSAMLib.finetune.retrieval import evaluate_retrieval, retrieval_table
    from MedCLIPSAMLib.models import load_clip

    if args.batch_pairs < 2 or args.runs < 1:
        print("medclipsam retrieval: error: --batch-pairs must be >= 2 and --runs >= 1.", file=sys.stderr)
        return EXIT_USAGE
    if args.output is not None and args.output.suffix.lower() == ".json":
        print(
            "medclipsam retrieval: error: --output takes the Markdown file (e.g. table.md); the JSON numbers are "
            "written next to it.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        table = read_caption_csv(
            args.data,
            image_column=args.image_column,
            caption_column=args.caption_column,
            min_caption_length=args.min_caption_length,
        )
        pairs = table.pairs
        if args.split != "all":
            train, validation = split_pairs(pairs, validation_fraction=args.validation_fraction, seed=args.seed)
            pairs = train if args.split == "train" else validation
        print(
            f"{len(pairs)} pairs ({args.split}); {table.dropped_short} of {table.rows_read} rows dropped with captions "
            f"under {args.min_caption_length} characters.",
            file=sys.stderr,
        )
        results = []
        for model_id in args.models:
            clip = load_clip(model_id, device=args.device, models_dir=args.models_dir)
            results.append(
                evaluate_retrieval(
                    clip,
                    pairs,
                    batch_pairs=args.batch_pairs,
                    runs=args.runs,
                    seed=args.seed,
                    num_workers=args.workers,
                    model_label=model_id,
                )
            )
    except (MedCLIPSAMError, OSError) as error:
        logger.debug("Retrieval failed.", exc_info=True)
        print(f"medclipsam retrieval: error: {error}", file=sys.stderr)
        return EXIT_FAILED

    markdown = retrieval_table(results)
    print(markdown)
    if args.output is not None:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(markdown + "\n", encoding="utf-8")
            numbers = [asdict(result) for result in results]
            args.output.with_suffix(".json").write_text(json.dumps(numbers, indent=2), encoding="utf-8")
        except OSError as error:
            print(f"medclipsam retrieval: error: cannot write {args.output}: {error}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK

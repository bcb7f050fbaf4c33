"""`medclipsam evaluate`: score zero-shot segmentations, or existing masks, against ground-truth masks.

Two modes:

* zero-shot: ``--images DIR --masks DIR --prompt TEXT [--prompt TEXT ...] [--prompts-file F]`` runs the pipeline
  with the same model options as ``medclipsam segment`` and scores the stages "saliency + CRF" and
  "saliency + SAM". ``--compare gradcam`` also runs GradCAM and adds paired t-tests. Two or more prompts add the
  prompt-sensitivity report.
* predictions: ``--predictions DIR --masks DIR [--scores DIR] [--images DIR]`` scores mask files from any tool
  (AUC from the score maps when given; images, when given, are the overlay background).

Files written into ``--output``:

* ``per_image.csv``: one line per image, prompt, method and stage (image, mask, prompt, method, stage, iou, dice,
  auc, found, seconds).
* ``summary.md``: mean +- sample standard deviation in %, n and 95 % confidence interval per method / stage /
  prompt, paired t-tests, prompt sensitivity and unmatched files.
* ``boxplot_iou.png``, ``boxplot_dice.png``, ``boxplot_auc.png`` and ``overlays.png`` (best, median and worst image
  by Dice, ground truth in green, prediction in red).
* ``prompt_sensitivity.csv`` with two or more prompts, and the masks under ``masks/<method>/<nn>_<prompt>/`` in
  zero-shot mode.

Exit codes: 0 when every paired image was evaluated. 1 when the models could not be loaded, a prediction could not
be scored, or any image failed in the pipeline. The other images are still reported, and summary.md lists the
failed ones. 2 for invalid arguments (checked before models are loaded) or when no image pairs with a mask.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from MedCLIPSAMLib.cli.options import (
    add_model_options,
    add_pipeline_options,
    check_threads,
    config_from_args,
    load_models,
)

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_PROG = "medclipsam evaluate"

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Score zero-shot segmentations or existing masks against ground-truth masks.",
        description=(
            "Zero-shot mode (--images, --masks, --prompt): run the pipeline on every image that has a mask and report "
            "IoU, Dice and pixel AUC of the coarse CRF mask and of the final SAM mask. Predictions mode "
            "(--predictions, --masks): score existing mask files. Images and masks pair by file name: a mask named "
            "like the image, <stem>_mask.* or <stem>_mask_<n>.* (several masks of one image are joined). Writes "
            "per_image.csv, summary.md, box plots and an overlay grid into --output."
        ),
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--images", type=Path, default=None, help="Folder of images (zero-shot mode).")
    inputs.add_argument("--masks", type=Path, required=True, help="Folder of ground-truth masks.")
    inputs.add_argument(
        "--prompt",
        "-p",
        action="append",
        default=[],
        help='Text naming the target, e.g. "breast tumor"; repeat the option to compare several prompts.',
    )
    inputs.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="Text file with one prompt per line (blank lines and lines starting with # are skipped).",
    )
    inputs.add_argument(
        "--predictions", type=Path, default=None, help="Folder of predicted masks to score (predictions mode)."
    )
    inputs.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="Folder of continuous score maps (float NRRD/TIFF or gray PNG) for the AUC in predictions mode.",
    )
    inputs.add_argument(
        "--name", default="predictions", help="Method name of the predictions in the reports (default: %(default)s)."
    )
    inputs.add_argument(
        "--limit", type=int, default=None, help="Evaluate only the first N image pairs in name order (default: all)."
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="Output folder; created if missing.")
    parser.add_argument(
        "--compare",
        choices=("gradcam",),
        default=None,
        help="Also run this saliency method and add paired t-tests against --saliency (zero-shot mode).",
    )

    add_model_options(parser)
    add_pipeline_options(parser)
    parser.set_defaults(func=run)
    return parser


class _UsageError(Exception):
    """Invalid command-line arguments; the message is printed as is."""


class _EvaluationFailed(Exception):
    """A run that produced no result at all; the message is printed as is."""


@dataclass
class _Outcome:
    """Everything the reports are written from.

    Attributes:
        rows: per-image `EvaluationRow` list.
        comparisons: paired t-tests (`ComparisonRow`).
        sensitivity: prompt-sensitivity rows.
        pairing: the `PairingResult` with unmatched files.
        overlay_sources: (label, row, ground-truth mask paths, prediction mask path, image path or None) per
            overlay panel.
        notes: lines written under the report's title.
        failed: (image name, error message) of images left out.
    """

    rows: list
    comparisons: list
    sensitivity: list
    pairing: object
    overlay_sources: list
    notes: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """Collect the prompts of --prompt and --prompts-file, in order, without duplicates."""
    prompts = [prompt.strip() for prompt in args.prompt]
    if any(not prompt for prompt in prompts):
        raise _UsageError("--prompt must not be empty.")
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except OSError as error:
            raise _UsageError(f"cannot read --prompts-file {str(args.prompts_file)!r}: {error}") from error
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    unique = list(dict.fromkeys(prompts))
    if len(unique) != len(prompts):
        logger.warning("Repeated prompts are evaluated once: %s", ", ".join(unique))
    return unique


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """Validate the combination of options and return the prompts (empty in predictions mode)."""
    if args.limit is not None and args.limit < 1:
        raise _UsageError(f"--limit must be at least 1, got {args.limit}.")
    if args.predictions is not None:
        if args.prompt or args.prompts_file is not None:
            raise _UsageError("--prompt and --prompts-file apply to zero-shot mode, not to --predictions.")
        if args.compare is not None:
            raise _UsageError("--compare applies to zero-shot mode, not to --predictions.")
        return []
    if args.images is None:
        raise _UsageError("give --images (zero-shot mode) or --predictions (score existing masks).")
    if args.scores is not None:
        raise _UsageError("--scores applies to --predictions mode only.")
    prompts = _read_prompts(args)
    if not prompts:
        raise _UsageError("zero-shot mode needs at least one --prompt or a --prompts-file with prompts.")
    if args.compare is not None and args.compare == args.saliency:
        raise _UsageError(f"--compare {args.compare} equals --saliency; choose two different methods.")
    return prompts


def _warn_unmatched(pairing) -> None:
    for path in pairing.unmatched_images:
        print(f"{_PROG}: warning: no mask for {path.name}; it is not evaluated.", file=sys.stderr)
    for path in pairing.unmatched_masks:
        print(f"{_PROG}: warning: mask {path.name} matches no image; it is ignored.", file=sys.stderr)


def _progress_printer():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(done: int, total: int, message: str) -> None:
        bar = bars.get("bar")
        if bar is None:
            bar = tqdm(total=total, desc="evaluate", unit="run", file=sys.stderr)
            bars["bar"] = bar
        bar.set_postfix_str(message[:60], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _run_zero_shot(args: argparse.Namespace, prompts: list[str], config) -> _Outcome:
    """Pair images with masks, run the pipeline and score it."""
    from MedCLIPSAMLib import evaluate as evaluation
    from MedCLIPSAMLib import reports

    pairing = evaluation.pair_images_and_masks(args.images, args.masks)
    _warn_unmatched(pairing)
    pairs = pairing.pairs[: args.limit] if args.limit else pairing.pairs
    if not pairs:
        raise _UsageError(f"no image in {str(args.images)!r} has a mask in {str(args.masks)!r}.")

    clip, sam_model = load_models(args)
    methods = [args.saliency] + ([args.compare] if args.compare else [])
    result = evaluation.evaluate_zero_shot(
        pairs,
        prompts,
        clip,
        sam_model,
        config=config,
        methods=methods,
        mask_output_dir=args.output / "masks",
        skip_failed=True,
        progress=_progress_printer(),
    )
    for name, message in result.failed:
        print(f"{_PROG}: warning: {name} failed and is left out: {message}", file=sys.stderr)
    if not result.rows:
        raise _EvaluationFailed(f"all {len(pairs)} images failed; see the warnings above.")
    comparisons = evaluation.compare_stages(result.rows)
    if args.compare:
        comparisons = evaluation.compare_methods(result.rows, args.saliency, args.compare) + comparisons

    # Overlays: best, median and worst image of the first method's final masks for the first prompt.
    by_name = {pair.name: pair for pair in pairs}
    sources = []
    for label, row in reports.select_examples(
        result.rows, method=args.saliency, stage=evaluation.STAGE_SAM, prompt=prompts[0]
    ):
        pair = by_name[row.image]
        prediction = result.saved_masks[(row.image, row.method, row.prompt, row.stage)]
        sources.append((label, row, pair.masks, prediction, pair.image))
    notes = [
        f"images: {args.images}, masks: {args.masks}, {len(pairs)} pairs evaluated",
        f"CLIP: {clip.model_id}; SAM: {args.sam_type} ({args.sam_checkpoint or 'default checkpoint'}); "
        f"device: {clip.device}",
        f"methods: {', '.join(methods)}; prompts: {'; '.join(prompts)}",
        f"parameters: {config.to_dict()}",
    ]
    return _Outcome(result.rows, comparisons, result.sensitivity, pairing, sources, notes, result.failed)


def _run_predictions(args: argparse.Namespace) -> _Outcome:
    """Pair existing predictions with masks (and score maps) and score them."""
    from MedCLIPSAMLib import evaluate as evaluation
    from MedCLIPSAMLib import reports

    cases, pairing = evaluation.prediction_cases_from_dirs(args.predictions, args.masks, args.scores)
    _warn_unmatched(pairing)
    cases = cases[: args.limit] if args.limit else cases
    if not cases:
        raise _UsageError(f"no prediction in {str(args.predictions)!r} has a mask in {str(args.masks)!r}.")
    rows = evaluation.evaluate_predictions(cases, method=args.name)

    images_by_key: dict[str, Path] = {}
    if args.images is not None:
        image_pairing = evaluation.pair_images_and_masks(args.images, args.masks)
        for pair in image_pairing.pairs:
            for mask in pair.masks:
                images_by_key[mask.name] = pair.image
    by_name = {case.image: case for case in cases}
    sources = []
    for label, row in reports.select_examples(rows):
        case = by_name[row.image]
        image_path = images_by_key.get(Path(case.y[0]).name) if images_by_key else None
        sources.append((label, row, case.y, case.y_pred, image_path))
    notes = [
        f"predictions: {args.predictions}, masks: {args.masks}, scores: {args.scores or 'none (AUC n/a)'}",
        f"{len(cases)} predictions evaluated",
    ]
    return _Outcome(rows, [], [], pairing, sources, notes)


def _write_reports(args: argparse.Namespace, outcome: _Outcome) -> Path:
    """Write the CSV files, summary.md, box plots and overlay grid; return the path of summary.md."""
    from MedCLIPSAMLib import evaluate as evaluation
    from MedCLIPSAMLib import reports

    output = args.output
    reports.write_rows_csv(output / "per_image.csv", outcome.rows)
    if outcome.sensitivity:
        reports.write_prompt_sensitivity_csv(output / "prompt_sensitivity.csv", outcome.sensitivity)
    summary = reports.write_summary_markdown(
        output / "summary.md",
        outcome.rows,
        comparisons=outcome.comparisons,
        sensitivity=outcome.sensitivity,
        pairing=outcome.pairing,
        failed=outcome.failed,
        title="MedCLIPSAM evaluation",
        notes=outcome.notes,
    )
    reports.write_box_plots(output, outcome.rows)
    examples = []
    for label, row, mask_paths, prediction_path, image_path in outcome.overlay_sources:
        y = evaluation.read_ground_truth(evaluation.ImageMaskPair(Path(mask_paths[0]), tuple(map(Path, mask_paths))))
        y_pred = evaluation.read_mask(prediction_path)
        examples.append(reports.load_overlay_example(label, row, y, y_pred, image_path))
    if examples:
        reports.write_overlay_grid(output / "overlays.png", examples)
    return summary


def run(args: argparse.Namespace) -> int:
    """Run `medclipsam evaluate` and return the exit code."""
    from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError

    try:
        prompts = _check_arguments(args)
        threads_error = check_threads(args)
        if threads_error:
            raise _UsageError(threads_error)
        config = config_from_args(args) if args.predictions is None else None
    except (_UsageError, InvalidInputError) as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"{_PROG}: error: cannot create output folder {args.output}: {error}", file=sys.stderr)
        return EXIT_FAILED

    try:
        if args.predictions is not None:
            outcome = _run_predictions(args)
        else:
            outcome = _run_zero_shot(args, prompts, config)
        summary = _write_reports(args, outcome)
    except _UsageError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (_EvaluationFailed, MedCLIPSAMError, OSError) as error:
        logger.debug("Evaluation failed.", exc_info=True)
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED

    from MedCLIPSAMLib.reports import format_summary_table

    print(format_summary_table(outcome.rows))
    print(f"\nReport: {summary}")
    if outcome.failed:
        print(f"{_PROG}: {len(outcome.failed)} images failed and are left out of the report.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK

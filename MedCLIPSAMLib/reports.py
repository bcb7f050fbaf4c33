"""Reports of evaluation rows: per-image CSV files, Markdown tables in the MedCLIP-SAM paper's layout, box plots and
an overlay grid of example cases.

Every report is computed from the per-image rows of `MedCLIPSAMLib.evaluate` (`EvaluationRow`,
`PromptSensitivityRow`), so a table can always be recomputed from its CSV file. Plots use
`matplotlib.figure.Figure` with the Agg canvas and never pyplot, so they leave no global figure state behind.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .evaluate import (
    CSV_COLUMNS,
    METRICS,
    NOT_AVAILABLE,
    SAM_STAGE_SALIENCY_WEIGHT,
    STAGE_CRF,
    STAGE_SAM,
    ComparisonRow,
    EvaluationRow,
    PairingResult,
    PromptSensitivityRow,
    _group_label,
    _group_rows,
    _natural_key,
    summarize_prompt_sensitivity,
    summarize_rows,
)

__all__ = [
    "OverlayExample",
    "format_comparison_table",
    "format_sensitivity_table",
    "format_summary_table",
    "load_overlay_example",
    "read_rows_csv",
    "select_examples",
    "write_box_plots",
    "write_overlay_grid",
    "write_prompt_sensitivity_csv",
    "write_rows_csv",
    "write_summary_markdown",
]

_METRIC_TITLES = {"iou": "IoU", "dice": "DSC", "auc": "AUC"}
_OVERLAY_MAX_SIDE = 1024  # pixels; larger images are subsampled for the overlay figure only

# --------------------------------------------------------------------------------------------------------------------
# CSV files


def _format_number(value: float | None) -> str:
    """Full-precision text of a metric (repr round-trips exactly), or "n/a"."""
    return NOT_AVAILABLE if value is None else repr(float(value))


def write_rows_csv(path: str | Path, rows: Iterable[EvaluationRow]) -> Path:
    """Write per-image rows to a CSV file with the columns `CSV_COLUMNS`.

    Metrics are written at full precision, an undefined AUC as "n/a", found as "true"/"false" and unmeasured
    seconds as an empty field.
    """
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row.image,
                    row.mask,
                    row.prompt,
                    row.method,
                    row.stage,
                    _format_number(row.iou),
                    _format_number(row.dice),
                    _format_number(row.auc),
                    "true" if row.found else "false",
                    "" if row.seconds is None else f"{row.seconds:.4f}",
                ]
            )
    return output


def _parse_optional(text: str) -> float | None:
    return None if text in ("", NOT_AVAILABLE) else float(text)


def read_rows_csv(path: str | Path) -> list[EvaluationRow]:
    """Read a CSV file written by `write_rows_csv` back into rows."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InvalidInputError(f"{str(path)!r} lacks the columns {missing}; expected {list(CSV_COLUMNS)}.")
        return [
            EvaluationRow(
                image=record["image"],
                mask=record["mask"],
                prompt=record["prompt"],
                method=record["method"],
                stage=record["stage"],
                iou=float(record["iou"]),
                dice=float(record["dice"]),
                auc=_parse_optional(record["auc"]),
                found=record["found"] == "true",
                seconds=_parse_optional(record["seconds"]),
            )
            for record in reader
        ]


def write_prompt_sensitivity_csv(path: str | Path, rows: Iterable[PromptSensitivityRow]) -> Path:
    """Write prompt-sensitivity rows to CSV (an undefined Pearson correlation is written as "n/a")."""
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = [item.name for item in dataclasses.fields(PromptSensitivityRow)]
    with output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [
                    row.image,
                    row.method,
                    row.prompt_a,
                    row.prompt_b,
                    _format_number(row.saliency_pearson),
                    _format_number(row.coarse_dice),
                    _format_number(row.mask_dice),
                ]
            )
    return output


# --------------------------------------------------------------------------------------------------------------------
# Markdown tables

_PLUS_MINUS = "\u00b1"


def _percent_mean_std(summary: dict) -> str:
    if summary["mean"] is None:
        return NOT_AVAILABLE
    text = f"{100.0 * summary['mean']:.2f}"
    if summary["std"] is not None:
        text += f" {_PLUS_MINUS} {100.0 * summary['std']:.2f}"
    return text


def _percent_interval(summary: dict) -> str:
    if summary["ci95_low"] is None:
        return NOT_AVAILABLE
    return f"[{100.0 * summary['ci95_low']:.2f}, {100.0 * summary['ci95_high']:.2f}]"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_summary_table(rows: Iterable[EvaluationRow]) -> str:
    """Format the per-group statistics as a Markdown table in the layout of the MedCLIP-SAM paper's tables.

    One line per method / stage / prompt; IoU, DSC and AUC as mean +- sample standard deviation (ddof = 1) in %,
    each followed by its 95 % confidence interval (t distribution); n counts images, and "AUC n/a" counts images
    whose AUC is undefined or not measured (left out of the AUC statistics).
    """
    header = ["method", "stage", "prompt", "n"]
    for metric in METRICS:
        title = _METRIC_TITLES[metric]
        header += [f"{title} (%)", f"{title} 95% CI"]
    header.append("AUC n/a")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summarize_rows(rows):
        cells = [summary.method, summary.stage, summary.prompt, str(summary.n_images)]
        for metric in METRICS:
            cells += [_percent_mean_std(summary.metric(metric)), _percent_interval(summary.metric(metric))]
        cells.append(str(summary.auc_undefined))
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _format_p(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.4g}"


def format_comparison_table(comparisons: Iterable[ComparisonRow]) -> str:
    """Format paired t-tests as a Markdown table (mean difference in percentage points, first minus second)."""
    header = ["metric", "first", "second", "n", "mean difference (points)", "t", "p", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for comparison in comparisons:
        result = comparison.result
        difference = result["mean_difference"]
        cells = [
            _METRIC_TITLES[comparison.metric],
            comparison.first,
            comparison.second,
            str(result["n"]),
            NOT_AVAILABLE if difference is None else f"{100.0 * difference:+.2f}",
            NOT_AVAILABLE if result["statistic"] is None else f"{result['statistic']:.4g}",
            _format_p(result["pvalue"]),
            result["note"] or "",
        ]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _plain_mean_std(summary: dict, scale: float, digits: int) -> str:
    if summary["mean"] is None:
        return NOT_AVAILABLE
    text = f"{scale * summary['mean']:.{digits}f}"
    if summary["std"] is not None:
        text += f" {_PLUS_MINUS} {scale * summary['std']:.{digits}f}"
    return text


def format_sensitivity_table(rows: Iterable[PromptSensitivityRow]) -> str:
    """Format prompt sensitivity as a Markdown table: Pearson r of the saliency maps, Dice of the masks in %."""
    header = ["method", "prompt A", "prompt B", "n", "saliency Pearson r", "coarse mask Dice (%)", "final mask Dice (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summarize_prompt_sensitivity(rows):
        cells = [
            summary["method"],
            summary["prompt_a"],
            summary["prompt_b"],
            str(summary["n_images"]),
            _plain_mean_std(summary["saliency_pearson"], 1.0, 3),
            _plain_mean_std(summary["coarse_dice"], 100.0, 2),
            _plain_mean_std(summary["mask_dice"], 100.0, 2),
        ]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


SUMMARY_CAPTION = (
    "IoU and DSC compare each stage's binary mask with the ground truth (masks binarised as > 0; both empty counts "
    "as 1, exactly one empty as 0). AUC is the pixel ROC AUC of a continuous map: the saliency map for "
    f"'{STAGE_CRF}', and the SAM-gated saliency (SAM mask + {SAM_STAGE_SALIENCY_WEIGHT} x saliency, which ranks "
    f"every pixel inside the SAM mask above every pixel outside it) for '{STAGE_SAM}'; for external predictions, "
    "the given score map. Values are mean "
    f"{_PLUS_MINUS} sample standard deviation (ddof = 1) over images, in %; the 95% CI is mean {_PLUS_MINUS} "
    "t(0.975, n - 1) x std / sqrt(n), not clipped to [0, 100]. Images with an undefined AUC (ground truth of one "
    "class) are left out of the AUC statistics and counted under 'AUC n/a'."
)
"""Caption printed under the summary table, stating what every column measures."""


def write_summary_markdown(
    path: str | Path,
    rows: Sequence[EvaluationRow],
    *,
    comparisons: Sequence[ComparisonRow] = (),
    sensitivity: Sequence[PromptSensitivityRow] = (),
    pairing: PairingResult | None = None,
    failed: Sequence[tuple[str, str]] = (),
    title: str = "Segmentation evaluation",
    notes: Sequence[str] = (),
) -> Path:
    """Write the Markdown report: summary table with caption, paired t-tests, prompt sensitivity, unmatched files.

    Args:
        path: output file (UTF-8).
        rows: per-image rows; the tables are computed from them.
        comparisons: paired t-tests to list (`compare_methods`, `compare_stages`).
        sensitivity: prompt-sensitivity rows; the section is left out when empty.
        pairing: when given, its unmatched images and masks are listed.
        failed: (image name, error message) of images left out because they failed.
        title: first heading.
        notes: extra lines written under the title (models, settings).
    """
    lines = [f"# {title}", ""]
    for note in notes:
        lines.append(f"- {note}")
    if notes:
        lines.append("")
    lines += ["## Segmentation", "", format_summary_table(rows), "", SUMMARY_CAPTION, ""]
    if comparisons:
        lines += [
            "## Paired t-tests",
            "",
            format_comparison_table(comparisons),
            "",
            "Two-sided paired t-test (scipy.stats.ttest_rel) on the images both groups scored; images with an "
            "undefined value in either group are left out. The mean difference is first minus second, in "
            "percentage points. p is n/a when fewer than 2 pairs remain or all differences are equal.",
            "",
        ]
    if sensitivity:
        lines += [
            "## Prompt sensitivity",
            "",
            format_sensitivity_table(sensitivity),
            "",
            f"Per image and pair of prompts: Pearson correlation of the two saliency maps (near 1 means the map "
            f"hardly depends on the prompt) and Dice between the two masks; mean {_PLUS_MINUS} sample standard "
            "deviation over images. A correlation is n/a for an image when one of its maps is constant.",
            "",
        ]
    if pairing is not None and (pairing.unmatched_images or pairing.unmatched_masks):
        lines += ["## Unmatched files", ""]
        lines += [f"- no mask for `{path.name}`" for path in pairing.unmatched_images]
        lines += [f"- no image for mask `{path.name}`" for path in pairing.unmatched_masks]
        lines.append("")
    if failed:
        lines += ["## Failed images (left out of every table)", ""]
        lines += [f"- `{name}`: {message}" for name, message in failed]
        lines.append("")
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines), encoding="utf-8")
    return output


# --------------------------------------------------------------------------------------------------------------------
# Figures


def _new_figure(width_inches: float, height_inches: float):
    """Create a Figure on an Agg canvas without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inches, height_inches), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def write_box_plots(output_dir: str | Path, rows: Sequence[EvaluationRow], prefix: str = "boxplot") -> list[Path]:
    """Write one box plot PNG per metric (``<prefix>_iou.png``, ``_dice.png``, ``_auc.png``) into `output_dir`.

    Each box is one method / stage / prompt group over images, in %. Undefined AUCs are left out; a group without
    any defined value gets an empty slot.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    groups = _group_rows(rows, ("method", "stage", "prompt"))
    labels = [_group_label(*key).replace(" / ", "\n") for key in groups]
    paths = []
    for metric in METRICS:
        values = [
            np.asarray([100.0 * row.metric(metric) for row in group if row.metric(metric) is not None])
            for group in groups.values()
        ]
        figure = _new_figure(max(4.0, 1.6 * len(groups) + 1.0), 4.5)
        axes = figure.add_subplot(1, 1, 1)
        positions = list(range(1, len(groups) + 1))
        filled = [index for index, data in enumerate(values) if data.size]
        if filled:
            axes.boxplot(
                [values[index] for index in filled], positions=[positions[index] for index in filled], showfliers=False
            )
            # Every image as a dot on top of its box, because boxes of a few images hide how many there are.
            for index in filled:
                axes.plot(np.full(values[index].size, positions[index]), values[index], "o", color="tab:blue",
                          alpha=0.4, markersize=3)  # fmt: skip
        axes.set_xticks(positions)
        axes.set_xticklabels(labels, fontsize=7)
        axes.set_xlim(0.5, len(groups) + 0.5)
        axes.set_ylim(-2.0, 102.0)
        axes.set_ylabel(f"{_METRIC_TITLES[metric]} (%)")
        axes.set_title(f"{_METRIC_TITLES[metric]} per image")
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        path = directory / f"{prefix}_{metric}.png"
        figure.savefig(path)
        paths.append(path)
    return paths


def select_examples(
    rows: Sequence[EvaluationRow], *, method: str | None = None, stage: str | None = None, prompt: str | None = None
) -> list[tuple[str, EvaluationRow]]:
    """Pick the best, median and worst image by Dice among rows of one group.

    Args:
        rows: per-image rows; those not matching `method`, `stage` and `prompt` (None matches all) are ignored.

    Returns:
        [("best", row), ("median", row), ("worst", row)] with fewer entries when fewer images exist; ties in Dice
        are broken by image name. The median is the lower median for an even count.
    """
    selected = [
        row
        for row in rows
        if (method is None or row.method == method)
        and (stage is None or row.stage == stage)
        and (prompt is None or row.prompt == prompt)
    ]
    ordered = sorted(selected, key=lambda row: (-row.dice, _natural_key(row.image)))
    if not ordered:
        return []
    picks = [("best", 0), ("median", (len(ordered) - 1) // 2), ("worst", len(ordered) - 1)]
    seen: set[int] = set()
    examples = []
    for label, index in picks:
        if index not in seen:
            seen.add(index)
            examples.append((label, ordered[index]))
    return examples


@dataclass
class OverlayExample:
    """One panel of the overlay grid.

    Attributes:
        title: panel title (e.g. "best: Dice 0.81" and the file name).
        y: [H, W] bool ground truth, drawn as a green contour.
        y_pred: [H, W] bool prediction, drawn as a red contour.
        image: [H, W, 3] uint8 background; None draws a black background.
    """

    title: str
    y: np.ndarray
    y_pred: np.ndarray
    image: np.ndarray | None = None


def load_overlay_example(
    label: str, row: EvaluationRow, y: np.ndarray, y_pred: np.ndarray, image_path: str | Path | None = None
) -> OverlayExample:
    """Build an `OverlayExample` for a selected row, reading and converting the image file when one is given."""
    image = None
    if image_path is not None:
        from .imaging import to_rgb_uint8
        from .io import read_image

        image = to_rgb_uint8(np.asarray(read_image(image_path)))
    title = f"{label}: Dice {row.dice:.3f}\n{row.image}"
    return OverlayExample(title=title, y=np.asarray(y) > 0, y_pred=np.asarray(y_pred) > 0, image=image)


def write_overlay_grid(path: str | Path, examples: Sequence[OverlayExample]) -> Path:
    """Write a PNG with one panel per example: the image with the ground-truth (green) and predicted (red) contours.

    Images larger than 1024 pixels per side are subsampled for display.

    Raises:
        InvalidInputError: when `examples` is empty or an example's arrays differ in size.
    """
    if not examples:
        raise InvalidInputError("write_overlay_grid needs at least one example.")
    figure = _new_figure(4.0 * len(examples), 4.6)
    for index, example in enumerate(examples):
        if example.y.shape != example.y_pred.shape or (
            example.image is not None and example.image.shape[:2] != example.y.shape
        ):
            raise InvalidInputError(
                f"Overlay {example.title!r}: ground truth {example.y.shape}, prediction {example.y_pred.shape} and "
                f"image {None if example.image is None else example.image.shape} must have the same height and width."
            )
        step = max(1, math.ceil(max(example.y.shape) / _OVERLAY_MAX_SIDE))
        y = example.y[::step, ::step]
        y_pred = example.y_pred[::step, ::step]
        background = (
            example.image[::step, ::step] if example.image is not None else np.zeros((*y.shape, 3), dtype=np.uint8)
        )
        axes = figure.add_subplot(1, len(examples), index + 1)
        axes.imshow(background, interpolation="nearest")
        # A contour needs both levels present; an empty or full mask has none to draw.
        if y.any() and not y.all():
            axes.contour(y.astype(np.float32), levels=[0.5], colors=["lime"], linewidths=1.2)
        if y_pred.any() and not y_pred.all():
            axes.contour(y_pred.astype(np.float32), levels=[0.5], colors=["red"], linewidths=1.2)
        axes.set_title(example.title, fontsize=8)
        axes.set_axis_off()
    figure.suptitle("green: ground truth, red: prediction", fontsize=9)
    figure.tight_layout()
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output

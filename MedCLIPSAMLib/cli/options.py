"""Command-line options shared by the commands that run the zero-shot pipeline.

`segment`, `segment-volume` and `evaluate` take the same model options (`add_model_options`) and the same
pipeline parameters (`add_pipeline_options`), so a parameter has one name, one default and one help text
everywhere. `config_from_args` and `load_models` turn the parsed options into a `ZeroShotConfig` and the models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = [
    "add_model_options",
    "add_pipeline_options",
    "check_threads",
    "config_from_args",
    "download_progress",
    "load_models",
]

# Parsed option name -> ZeroShotConfig field, for the options forwarded to the pipeline.
_CONFIG_OPTIONS = {
    "saliency": "saliency",
    "top_k": "top_k",
    "batch_size": "batch_size",
    "window": "window",
    "crf_tau": "crf_tau",
    "crf_gaussian_sxy": "crf_gaussian_sxy",
    "crf_gaussian_compat": "crf_gaussian_compat",
    "crf_bilateral_sxy": "crf_bilateral_sxy",
    "crf_bilateral_srgb": "crf_bilateral_srgb",
    "crf_bilateral_compat": "crf_bilateral_compat",
    "crf_iterations": "crf_iterations",
    "min_box_area": "min_box_area",
    "max_boxes": "max_boxes",
    "box_margin": "box_margin",
    "presence_threshold": "presence_threshold",
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the "models" option group: --clip, --sam-type, --sam-checkpoint, --models-dir, --no-download,
    --device, --dtype and --threads."""
    from MedCLIPSAMLib.models import DEFAULT_CLIP_ID, SAM_TYPES

    models = parser.add_argument_group("models")
    models.add_argument(
        "--clip",
        default=DEFAULT_CLIP_ID,
        help="BiomedCLIP model: an open_clip hf-hub: id, local-dir:/path, a folder path, or 'tiny' for the "
        "random-weight test model (default: %(default)s).",
    )
    models.add_argument("--sam-type", choices=SAM_TYPES, default="vit_b", help="SAM architecture (default: vit_b).")
    models.add_argument(
        "--sam-checkpoint", type=Path, default=None, help="SAM checkpoint file; default: the one in --models-dir."
    )
    models.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="Folder of downloaded weights (default: $MEDCLIPSAM_MODELS_DIR, else ~/.cache/medclipsam).",
    )
    models.add_argument(
        "--no-download", action="store_true", help="Fail instead of downloading a missing SAM checkpoint."
    )
    models.add_argument(
        "--device", default="auto", help="Torch device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."
    )
    models.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help=(
            "Compute type of the CLIP image tower and SAM's image encoder. bfloat16 runs their matrix products in "
            "bfloat16 through autocast (weights, normalisations and SAM's mask decoder stay float32), about twice "
            "as fast on CPUs with AVX512_BF16 or AMX and on GPUs from Ampere on. auto picks bfloat16 on such "
            "hardware and float32 elsewhere; float32 gives results that do not depend on the hardware "
            "(default: auto)."
        ),
    )
    models.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch; default: torch's own default, one per physical core.",
    )


def add_pipeline_options(parser: argparse.ArgumentParser, *, presence_threshold: bool = False) -> None:
    """Add the "saliency", "dense CRF" and "boxes" option groups with the `ZeroShotConfig` defaults.

    Args:
        parser: The subcommand's parser.
        presence_threshold: Also add --presence-threshold (volumes: skip slices with a low CLIP score).
    """
    from MedCLIPSAMLib.pipeline import SALIENCY_METHODS, ZeroShotConfig

    defaults = ZeroShotConfig()
    saliency = parser.add_argument_group("saliency")
    saliency.add_argument(
        "--saliency", choices=SALIENCY_METHODS, default=defaults.saliency, help="Saliency method (default: gscorecam)."
    )
    saliency.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="gScoreCAM channels kept (default: %(default)s)."
    )
    saliency.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="Masked CLIP forwards per batch in gScoreCAM (default: %(default)s).",
    )
    saliency.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=None,
        help="Intensity window for images that are not 8-bit, in stored units, e.g. -160 240 for CT soft tissue "
        "(default: 0.5-99.5 percentiles; of the whole volume for segment-volume).",
    )
    if presence_threshold:
        saliency.add_argument(
            "--presence-threshold",
            type=float,
            default=None,
            help="Skip slices whose CLIP score (logit scale times cosine) is below this value; skipped slices get "
            "an empty mask and are listed in the report (default: no skipping).",
        )

    crf = parser.add_argument_group("dense CRF")
    crf_options = (
        ("--crf-tau", float, defaults.crf_tau, "Unary temperature"),
        ("--crf-gaussian-sxy", float, defaults.crf_gaussian_sxy, "Smoothness kernel width in pixels"),
        ("--crf-gaussian-compat", float, defaults.crf_gaussian_compat, "Smoothness kernel weight"),
        ("--crf-bilateral-sxy", float, defaults.crf_bilateral_sxy, "Appearance kernel width in pixels"),
        ("--crf-bilateral-srgb", float, defaults.crf_bilateral_srgb, "Appearance kernel colour width in 8-bit units"),
        ("--crf-bilateral-compat", float, defaults.crf_bilateral_compat, "Appearance kernel weight"),
        ("--crf-iterations", int, defaults.crf_iterations, "Mean-field iterations"),
    )
    for option, kind, default, text in crf_options:
        crf.add_argument(option, type=kind, default=default, help=f"{text} (default: %(default)s).")

    boxes = parser.add_argument_group("boxes")
    boxes.add_argument(
        "--min-box-area",
        type=int,
        default=defaults.min_box_area,
        help="Coarse-mask components smaller than this many pixels get no box (default: %(default)s).",
    )
    boxes.add_argument(
        "--max-boxes", type=int, default=None, help="Keep at most this many boxes, largest first (default: all)."
    )
    boxes.add_argument(
        "--box-margin",
        type=int,
        default=defaults.box_margin,
        help="Pixels added on every side of each box (default: %(default)s).",
    )


def config_from_args(args: argparse.Namespace, **overrides):
    """Build the `ZeroShotConfig` of the parsed pipeline options; --dtype sets its precision.

    Raises:
        InvalidInputError: for an invalid parameter value, before any model is loaded.
    """
    from MedCLIPSAMLib.pipeline import ZeroShotConfig

    values = {field: getattr(args, option) for option, field in _CONFIG_OPTIONS.items() if hasattr(args, option)}
    values["precision"] = args.dtype
    if values.get("window") is not None:
        values["window"] = tuple(values["window"])
    values.update(overrides)
    return ZeroShotConfig(**values)


def download_progress():
    """Return a progress(done, total, message) callback that shows a tqdm bar for a weights download."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def progress(done: int, total: int, message: str = "") -> None:
        if not bars:
            description = message or "download"
            bars.append(tqdm(total=total or None, unit="B", unit_scale=True, desc=description, file=sys.stderr))
        bar = bars[0]
        bar.update(max(0, done - bar.n))
        if total and done >= total:
            bar.close()

    return progress


def load_models(args: argparse.Namespace):
    """Load the CLIP and SAM models named by the parsed model options; returns ``(clip, sam_model)``.

    Raises:
        WeightsError: missing, corrupt or undownloadable weights.
    """
    import torch

    from MedCLIPSAMLib.models import load_clip, load_sam

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The CLIP weights stay float32 for every --dtype: the pipeline autocasts them (ZeroShotConfig.precision),
    # which is as fast as bfloat16 weights on CPU and keeps the saliency map closer to float32.
    clip = load_clip(args.clip, device=args.device, dtype=torch.float32, models_dir=args.models_dir)
    sam_model = load_sam(
        args.sam_type,
        checkpoint=args.sam_checkpoint,
        device=args.device,
        models_dir=args.models_dir,
        download=not args.no_download,
        progress=download_progress(),
    )
    return clip, sam_model


def check_threads(args: argparse.Namespace) -> str | None:
    """Return an error message for an invalid --threads value, else None."""
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}."
    return None

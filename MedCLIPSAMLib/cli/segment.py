"""`medclipsam segment`: zero-shot segmentation of 2D images from a text prompt.

For every input image the command writes into the output folder:

* ``<stem>_mask.png``: final mask, 8-bit, 0 background and 255 foreground, same size as the input.
* ``<stem>_mask.nrrd``: the same mask (uint8 0/1) with the input's spacing, origin and direction when it has them.
* ``<stem>_saliency.nrrd``: saliency map, float32 in [0, 1], same geometry.
* ``<stem>_saliency.png``: saliency map scaled to 0..255.
* ``<stem>_overlay.png``: heat map, mask outline and boxes over the prepared image.
* ``<stem>.json``: prompt, models, boxes, found flag, CLIP score, seconds per stage, image size, parameters, version.

Exit codes: 0 when every image was processed (including images where the target was not found), 1 when any image
failed or the models could not be loaded, 2 for invalid arguments such as an empty prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_DOUBLE_SUFFIXES = (".nii.gz", ".nrrd.gz", ".mha.gz")

# Command-line option -> ZeroShotConfig field, for the options forwarded to the pipeline.
_CONFIG_OPTIONS = {
    "saliency": "saliency",
    "top_k": "top_k",
    "batch_size": "batch_size",
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
    "window": "window",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``segment`` subcommand on an argparse subparsers object."""
    from MedCLIPSAMLib.models import DEFAULT_CLIP_ID, SAM_TYPES
    from MedCLIPSAMLib.pipeline import MIN_IMAGE_SIDE, SALIENCY_METHODS, ZeroShotConfig

    defaults = ZeroShotConfig()
    parser = subparsers.add_parser(
        "segment",
        help="Segment 2D images from a text prompt (zero-shot).",
        description=(
            "Segment the structure named by --prompt in each IMAGE with BiomedCLIP saliency, a dense CRF and SAM box "
            "prompts, and write mask, saliency, overlay and a JSON report per image into --output. Inputs: PNG, "
            "JPEG, TIFF, BMP, single-frame DICOM, 2D NRRD/NIfTI/MHA; 8 or 16 bits, gray, RGB or RGBA; at least "
            f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} pixels. Exit code 0 "
            "when every image was processed, 1 when any image failed (one line per failure on stderr) or the models "
            "could not be loaded, 2 for invalid arguments such as an empty prompt (checked before loading models)."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="Input image files.")
    parser.add_argument("--prompt", "-p", required=True, help='Text naming the target, e.g. "breast tumor".')
    parser.add_argument("--output", "-o", required=True, type=Path, help="Output folder; created if missing.")

    models = parser.add_argument_group("models")
    models.add_argument(
        "--clip",
        default=DEFAULT_CLIP_ID,
        help="BiomedCLIP model: an open_clip hf-hub: id, local-dir:/path, or a folder path (default: %(default)s).",
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
        choices=("float32", "bfloat16"),
        default="float32",
        help=(
            "Compute type of the CLIP image tower and SAM's image encoder. bfloat16 runs their matrix products in "
            "bfloat16 through autocast (weights, normalisations and SAM's mask decoder stay float32); it is several "
            "times faster on CPUs with AVX512_BF16 or AMX and on GPUs (default: float32)."
        ),
    )

    models.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch; default: torch's own default, one per physical core.",
    )

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
        help="Intensity window for images that are not 8-bit, in stored units (default: 0.5-99.5 percentiles).",
    )

    crf = parser.add_argument_group("dense CRF")
    crf.add_argument("--crf-tau", type=float, default=defaults.crf_tau, help="Unary temperature (default: %(default)s).")
    crf.add_argument(
        "--crf-gaussian-sxy",
        type=float,
        default=defaults.crf_gaussian_sxy,
        help="Smoothness kernel width in pixels (default: %(default)s).",
    )
    crf.add_argument(
        "--crf-gaussian-compat",
        type=float,
        default=defaults.crf_gaussian_compat,
        help="Smoothness kernel weight (default: %(default)s).",
    )
    crf.add_argument(
        "--crf-bilateral-sxy",
        type=float,
        default=defaults.crf_bilateral_sxy,
        help="Appearance kernel width in pixels (default: %(default)s).",
    )
    crf.add_argument(
        "--crf-bilateral-srgb",
        type=float,
        default=defaults.crf_bilateral_srgb,
        help="Appearance kernel colour width in 8-bit units (default: %(default)s).",
    )
    crf.add_argument(
        "--crf-bilateral-compat",
        type=float,
        default=defaults.crf_bilateral_compat,
        help="Appearance kernel weight (default: %(default)s).",
    )
    crf.add_argument(
        "--crf-iterations",
        type=int,
        default=defaults.crf_iterations,
        help="Mean-field iterations (default: %(default)s).",
    )

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
    parser.set_defaults(func=run)
    return parser


def _config_from_args(args: argparse.Namespace):
    from MedCLIPSAMLib.pipeline import ZeroShotConfig

    values = {field: getattr(args, option) for option, field in _CONFIG_OPTIONS.items()}
    values["precision"] = args.dtype
    if values["window"] is not None:
        values["window"] = tuple(values["window"])
    return ZeroShotConfig(**values)


def _output_stem(path: Path, used: set[str]) -> str:
    """Return the file name without its image suffix, made unique among `used` (which it updates)."""
    name = path.name
    lower = name.lower()
    stem = next((name[: -len(suffix)] for suffix in _DOUBLE_SUFFIXES if lower.endswith(suffix)), None)
    if stem is None:
        stem = path.stem if path.suffix else name
    stem = stem or "image"
    candidate = stem
    number = 1
    while candidate in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate)
    return candidate


def _download_progress():
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


def _load_models(args: argparse.Namespace):
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
        progress=_download_progress(),
    )
    return clip, sam_model


def _sam_checkpoint(args: argparse.Namespace) -> Path:
    """Return the SAM checkpoint file the run used: --sam-checkpoint, else the models folder's file."""
    from MedCLIPSAMLib.models import sam_checkpoint_path

    if args.sam_checkpoint is not None:
        return args.sam_checkpoint
    return sam_checkpoint_path(args.sam_type, args.models_dir)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image)).save(str(path))


def _write_outputs(
    args, stem: str, path: Path, image: np.ndarray, geometry, result, config, clip, compute_dtype
) -> dict:
    """Write the five image outputs and the JSON report of one segmented image; return the report."""
    from MedCLIPSAMLib import __version__
    from MedCLIPSAMLib.io import write_mask_png, write_nrrd
    from MedCLIPSAMLib.overlay import render_overlay, saliency_to_uint8

    output = args.output
    outputs = {
        "mask_png": output / f"{stem}_mask.png",
        "mask_nrrd": output / f"{stem}_mask.nrrd",
        "saliency_nrrd": output / f"{stem}_saliency.nrrd",
        "saliency_png": output / f"{stem}_saliency.png",
        "overlay_png": output / f"{stem}_overlay.png",
        "report_json": output / f"{stem}.json",
    }
    write_mask_png(outputs["mask_png"], result.mask)
    write_nrrd(outputs["mask_nrrd"], result.mask.astype(np.uint8), geometry)
    write_nrrd(outputs["saliency_nrrd"], result.saliency.astype(np.float32), geometry)
    _write_png(outputs["saliency_png"], saliency_to_uint8(result.saliency))
    _write_png(outputs["overlay_png"], render_overlay(result.rgb, result.saliency, result.mask, result.boxes))

    height, width = image.shape[:2]
    report = {
        "input": str(path),
        "prompt": result.prompt,
        "found": bool(result.found),
        "clip_score": float(result.clip_score),
        "boxes": [[int(value) for value in box] for box in result.boxes],
        "box_format": "XYXY pixel coordinates, inclusive maxima",
        "mask_pixels": int(result.mask.sum()),
        "image": {"width": int(width), "height": int(height), "dtype": str(image.dtype), "shape": list(image.shape)},
        "seconds": {stage: round(float(value), 4) for stage, value in result.timings.items()},
        "clip_model": clip.model_id,
        "clip_dtype": str(clip.dtype).replace("torch.", ""),
        "precision": str(compute_dtype).replace("torch.", ""),
        "sam_type": args.sam_type,
        "sam_checkpoint": str(_sam_checkpoint(args)),
        "device": str(clip.device),
        "parameters": config.to_dict(),
        "version": __version__,
        "outputs": {key: value.name for key, value in outputs.items()},
    }
    outputs["report_json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run(args: argparse.Namespace) -> int:
    """Run `medclipsam segment` and return the exit code."""
    from tqdm import tqdm

    from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError

    # Invalid arguments fail here, before any model is loaded.
    if not args.prompt or not args.prompt.strip():
        print("medclipsam segment: error: --prompt must not be empty.", file=sys.stderr)
        return EXIT_USAGE
    if args.threads is not None and args.threads < 1:
        print(f"medclipsam segment: error: --threads must be at least 1, got {args.threads}.", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = _config_from_args(args)
    except InvalidInputError as error:
        print(f"medclipsam segment: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"medclipsam segment: error: cannot create output folder {args.output}: {error}", file=sys.stderr)
        return EXIT_FAILED

    from MedCLIPSAMLib.io import read_image_with_geometry
    from MedCLIPSAMLib.pipeline import ZeroShotSegmenter

    try:
        clip, sam_model = _load_models(args)
    except (MedCLIPSAMError, OSError) as error:
        print(f"medclipsam segment: error: model loading failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    segmenter = ZeroShotSegmenter(clip, sam_model, config)

    failures = 0
    used_stems: set[str] = set()
    paths = [Path(image) for image in args.images]
    with tqdm(paths, desc="segment", unit="image", file=sys.stderr) as bar:
        for path in bar:
            stem = _output_stem(path, used_stems)
            try:
                image, geometry = read_image_with_geometry(path)
                result = segmenter.segment(image, args.prompt)
                _write_outputs(
                    args, stem, path, image, geometry, result, config, clip, segmenter.compute_dtype
                )
            except (MedCLIPSAMError, OSError) as error:
                failures += 1
                logger.debug("Segmentation of %s failed.", path, exc_info=True)
                bar.write(f"medclipsam segment: {path}: failed: {error}", file=sys.stderr)
                continue
            if not result.found:
                bar.write(f"medclipsam segment: {path}: target not found; wrote an empty mask.", file=sys.stderr)

    if failures:
        print(f"medclipsam segment: {failures} of {len(paths)} images failed.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK

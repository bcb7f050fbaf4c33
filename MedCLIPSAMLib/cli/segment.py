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

_DOUBLE_SUFFIXES = (".nii.gz", ".nrrd.gz", ".mha.gz")

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``segment`` subcommand on an argparse subparsers object."""
    from MedCLIPSAMLib.pipeline import MIN_IMAGE_SIDE

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

    add_model_options(parser)
    add_pipeline_options(parser)
    parser.set_defaults(func=run)
    return parser


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
    threads_error = check_threads(args)
    if threads_error:
        print(f"medclipsam segment: error: {threads_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = config_from_args(args)
    except InvalidInputError as error:
        print(f"medclipsam segment: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    # Missing inputs are reported before the models load, which can take minutes or fail on its own.
    paths = []
    failures = 0
    for image in args.images:
        path = Path(image)
        if path.is_file():
            paths.append(path)
        else:
            failures += 1
            print(f"medclipsam segment: {path}: failed: image file not found.", file=sys.stderr)
    if not paths:
        print(f"medclipsam segment: none of the {len(args.images)} input images exists.", file=sys.stderr)
        return EXIT_FAILED

    from MedCLIPSAMLib.io import read_image_with_geometry
    from MedCLIPSAMLib.pipeline import ZeroShotSegmenter

    try:
        clip, sam_model = load_models(args)
    except (MedCLIPSAMError, OSError) as error:
        print(f"medclipsam segment: error: model loading failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    segmenter = ZeroShotSegmenter(clip, sam_model, config)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"medclipsam segment: error: cannot create output folder {args.output}: {error}", file=sys.stderr)
        return EXIT_FAILED

    found_count = 0
    used_stems: set[str] = set()
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
            if result.found:
                found_count += 1
            else:
                bar.write(f"medclipsam segment: {path}: target not found; wrote an empty mask.", file=sys.stderr)

    processed = len(args.images) - failures
    print(f"{args.prompt}: found in {found_count} of {processed} processed images -> {args.output}")
    if failures:
        print(f"medclipsam segment: {failures} of {len(args.images)} images failed.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK

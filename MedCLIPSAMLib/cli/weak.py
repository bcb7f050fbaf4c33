"""`medclipsam pseudo-label`, `weak-train` and `weak-predict`: the weak-supervision workflow.

    medclipsam pseudo-label --images train/images --prompt "lungs" --output pseudo      # zero-shot masks
    medclipsam weak-train --images train/images --masks pseudo/masks --output run      # residual U-Net
    medclipsam weak-predict test/*.png --model run/best.pt --output predictions

`pseudo-label` and `weak-train` also run under torchrun: pseudo-label splits the images across ranks,
weak-train uses DistributedDataParallel. Exit codes: 0 success, 1 failure (models, files, images that
failed), 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run_pseudo_label", "run_weak_predict", "run_weak_train"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_VOLUME_ENDINGS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def add_parser(subparsers) -> None:
    """Register ``pseudo-label``, ``weak-train`` and ``weak-predict`` on an argparse subparsers object."""
    _add_pseudo_label(subparsers)
    _add_weak_train(subparsers)
    _add_weak_predict(subparsers)


# ----------------------------------------------------------------------------------------------- parsers


def _add_pseudo_label(subparsers) -> None:
    from MedCLIPSAMLib.models import DEFAULT_CLIP_ID, SAM_TYPES
    from MedCLIPSAMLib.pipeline import SALIENCY_METHODS, ZeroShotConfig

    defaults = ZeroShotConfig()
    parser = subparsers.add_parser(
        "pseudo-label",
        help="Write zero-shot masks for every image of a folder (training labels for weak-train).",
        description=(
            "Segment every image of --images with the zero-shot pipeline and write OUTPUT/masks/<stem>.png "
            "(0/255) and OUTPUT/records/<stem>.json. Finished images are skipped, so an interrupted run resumes "
            "where it stopped. Under torchrun (or with RANK and WORLD_SIZE set) each rank takes every "
            "WORLD_SIZE-th image of the sorted list, starting at its RANK."
        ),
    )
    parser.add_argument("--images", required=True, type=Path, help="Folder of training images.")
    parser.add_argument("--prompt", "-p", required=True, help='Text naming the target, e.g. "lungs".')
    parser.add_argument("--output", "-o", required=True, type=Path, help="Output folder; created if missing.")
    parser.add_argument("--save-saliency", action="store_true", help="Also write OUTPUT/saliency/<stem>.png.")
    models = parser.add_argument_group("models (as in `medclipsam segment`)")
    models.add_argument("--clip", default=DEFAULT_CLIP_ID, help="BiomedCLIP: hf-hub: id, local-dir:/path or folder.")
    models.add_argument("--sam-type", choices=SAM_TYPES, default="vit_b", help="SAM architecture (default: vit_b).")
    models.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM checkpoint file.")
    models.add_argument("--models-dir", type=Path, default=None, help="Folder of downloaded weights.")
    models.add_argument("--no-download", action="store_true", help="Fail instead of downloading a SAM checkpoint.")
    models.add_argument(
        "--device",
        default="auto",
        help="Torch device: auto, cpu, cuda, cuda:N, mps. Under torchrun, auto and cuda mean cuda:LOCAL_RANK.",
    )
    pipeline = parser.add_argument_group("zero-shot pipeline")
    pipeline.add_argument("--saliency", choices=SALIENCY_METHODS, default=defaults.saliency, help="Saliency method.")
    pipeline.add_argument("--top-k", type=int, default=defaults.top_k, help="gScoreCAM channels kept (default: 60).")
    pipeline.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="Masked CLIP forwards per gScoreCAM batch."
    )
    pipeline.add_argument(
        "--window", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
        help="Intensity window for images that are not 8-bit (default: 0.5-99.5 percentiles).",
    )
    parser.set_defaults(func=run_pseudo_label)


def _add_weak_train(subparsers) -> None:
    from MedCLIPSAMLib.weak.train import WeakTrainConfig

    defaults = WeakTrainConfig()
    parser = subparsers.add_parser(
        "weak-train",
        help="Train a residual U-Net on (pseudo-)masks.",
        description=(
            "Train a deep residual U-Net on the images of --images and the masks of --masks (paired by file "
            "stem; <stem>.png and <stem>_mask.png both pair with <stem>.jpg) with Dice + BCE loss and Adam. A "
            "seeded validation split selects OUTPUT/best.pt by validation Dice; OUTPUT/last.pt allows --resume. "
            "Runs under torchrun with DistributedDataParallel (NCCL on GPUs, gloo on CPUs)."
        ),
    )
    parser.add_argument("--images", required=True, type=Path, help="Folder of training images.")
    parser.add_argument("--masks", required=True, type=Path, help="Folder of masks, e.g. pseudo-label's OUTPUT/masks.")
    parser.add_argument("--output", "-o", required=True, type=Path, help="Folder for best.pt, last.pt, history.json.")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="Maximum epochs (default: %(default)s).")
    parser.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="Network input side in pixels (default: %(default)s)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="Samples per step and rank (default: %(default)s)."
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (default: %(default)s).")
    parser.add_argument(
        "--width", type=int, default=defaults.base_channels,
        help="U-Net channels at full resolution (default: %(default)s).",
    )
    parser.add_argument(
        "--depth", type=int, default=defaults.depth, help="U-Net downsamplings (default: %(default)s)."
    )
    parser.add_argument(
        "--patience", type=int, default=defaults.patience,
        help="Stop after this many epochs without a better validation Dice (default: %(default)s).",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=defaults.val_fraction,
        help="Fraction of pairs held out for validation; 0 validates on the training pairs (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed of split, weights and augmentation.")
    parser.add_argument("--device", default="auto", help="Torch device: auto, cpu, cuda, cuda:N, mps.")
    parser.add_argument("--resume", action="store_true", help="Continue the run in OUTPUT from last.pt.")
    parser.add_argument(
        "--flip", action="store_true",
        help="Augment with left-right flips. Off by default because anatomy is lateral (heart, liver); turn it "
        "on for targets without a side, such as breast lesions.",
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats,
        help="Augmented copies of each training pair per epoch (default: %(default)s).",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="Data loader worker processes (default: 0).")
    parser.add_argument("--time-limit", type=float, default=None, help="Stop after the epoch that passes this many seconds.")
    parser.set_defaults(func=run_weak_train)


def _volume_axis(text: str) -> str | int:
    """Parse weak-predict's --axis: an anatomical plane name, or an array axis 0, 1 or 2."""
    from MedCLIPSAMLib.geometry import ANATOMICAL_AXES

    value = text.strip().lower()
    if value in ANATOMICAL_AXES:
        return value
    if value in ("0", "1", "2"):
        return int(value)
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither an anatomical plane ({', '.join(sorted(ANATOMICAL_AXES))}) nor an array axis "
        "(0, 1 or 2)."
    )


def _add_weak_predict(subparsers) -> None:
    parser = subparsers.add_parser(
        "weak-predict",
        help="Segment images or volumes with a trained residual U-Net.",
        description=(
            "Apply a weak-train checkpoint to each INPUT. 2D images give OUTPUT/<stem>_mask.png (0/255) and "
            "OUTPUT/<stem>_probability.nrrd (float32 in [0, 1]) or .png (0-255) at the original size. 3D volumes "
            "(NRRD, NIfTI, MHA) are segmented slice by slice along --axis and give <stem>_mask and "
            "<stem>_probability volumes in the input's format with the input's geometry."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="Image or volume files.")
    parser.add_argument("--model", "-m", required=True, type=Path, help="Checkpoint written by weak-train (best.pt).")
    parser.add_argument("--output", "-o", required=True, type=Path, help="Output folder; created if missing.")
    parser.add_argument("--device", default="auto", help="Torch device: auto, cpu, cuda, cuda:N, mps.")
    parser.add_argument(
        "--threshold", type=float, default=None, help="Foreground probability threshold (default: the checkpoint's, 0.5)."
    )
    parser.add_argument(
        "--probability-format", choices=("nrrd", "png"), default="nrrd",
        help="File type of 2D probability maps (default: nrrd, float32).",
    )
    parser.add_argument(
        "--axis", type=_volume_axis, default="axial", metavar="{axial,coronal,sagittal,0,1,2}",
        help="Plane of the slices of a volume: an anatomical plane, cut along the voxel axis closest to its normal "
        "as in segment-volume (default: axial), or an array axis 0, 1 or 2 of the [K, J, I] voxel array.",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Slices per forward pass (default: 8).")
    parser.add_argument("--prompt", default="", help="Text stored with the results; the network does not use it.")
    parser.set_defaults(func=run_weak_predict)


# ----------------------------------------------------------------------------------------------- pseudo-label


def _progress_printer(label: str):
    def progress(done: int, total: int, message: str) -> None:
        print(f"{label} {done}/{total}: {message}", file=sys.stderr, flush=True)

    return progress


def _rank_device(request: str) -> str:
    """Map "auto"/"cuda" to cuda:LOCAL_RANK when torchrun started several processes on a GPU machine."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or request not in ("auto", "cuda") or not torch.cuda.is_available():
        return request
    return f"cuda:{int(local_rank) % torch.cuda.device_count()}"


def run_pseudo_label(args: argparse.Namespace) -> int:
    """Run `medclipsam pseudo-label` and return the exit code."""
    from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError
    from MedCLIPSAMLib.models import load_clip, load_sam
    from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter
    from MedCLIPSAMLib.weak.pseudolabel import pseudo_label_dataset, rank_from_environment

    name = "medclipsam pseudo-label"
    if not args.prompt.strip():
        print(f"{name}: error: --prompt must not be empty.", file=sys.stderr)
        return EXIT_USAGE
    try:
        window = tuple(args.window) if args.window is not None else None
        config = ZeroShotConfig(saliency=args.saliency, top_k=args.top_k, batch_size=args.batch_size, window=window)
        rank, world_size = rank_from_environment()
    except InvalidInputError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    device = _rank_device(args.device)
    try:
        clip = load_clip(args.clip, device=device, models_dir=args.models_dir)
        sam_model = load_sam(
            args.sam_type, checkpoint=args.sam_checkpoint, device=device, models_dir=args.models_dir,
            download=not args.no_download,
        )
    except (MedCLIPSAMError, OSError) as error:
        print(f"{name}: error: model loading failed: {error}", file=sys.stderr)
        return EXIT_FAILED

    segmenter = ZeroShotSegmenter(clip, sam_model, config)
    try:
        summary = pseudo_label_dataset(
            segmenter, args.images, args.prompt, args.output, rank=rank, world_size=world_size,
            save_saliency=args.save_saliency, progress=_progress_printer(f"rank {rank}"),
        )
    except InvalidInputError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{name}: rank {rank} of {world_size}: {len(summary.labelled)} labelled ({summary.found} with the target), "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed of {summary.assigned} images.",
        file=sys.stderr,
    )
    for image_name, message in summary.failed.items():
        print(f"{name}: {image_name}: failed: {message}", file=sys.stderr)
    return EXIT_FAILED if summary.failed else EXIT_OK


# ----------------------------------------------------------------------------------------------- weak-train


def run_weak_train(args: argparse.Namespace) -> int:
    """Run `medclipsam weak-train` and return the exit code."""
    from MedCLIPSAMLib.errors import CancelledError, InvalidInputError, MedCLIPSAMError
    from MedCLIPSAMLib.weak.data import AugmentConfig
    from MedCLIPSAMLib.weak.train import WeakTrainConfig, train_weak

    name = "medclipsam weak-train"
    try:
        config = WeakTrainConfig(
            epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
            base_channels=args.width, depth=args.depth, patience=args.patience, val_fraction=args.val_fraction,
            seed=args.seed, device=args.device, repeats=args.repeats, num_workers=args.num_workers,
            max_seconds=args.time_limit, augment=AugmentConfig(flip_lr=args.flip),
        )
    except InvalidInputError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    is_main = os.environ.get("RANK", "0") in ("", "0")
    try:
        result = train_weak(
            args.images, args.masks, args.output, config, resume=args.resume,
            progress=_progress_printer("weak-train") if is_main else None,
        )
    except InvalidInputError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CancelledError, MedCLIPSAMError, OSError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if is_main:
        print(
            f"{name}: {result.epochs_completed} epochs ({result.stop_reason}); best validation Dice "
            f"{result.best_val_dice:.4f} at epoch {result.best_epoch}; checkpoint {result.best_checkpoint}",
            file=sys.stderr,
        )
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- weak-predict


def _split_ending(path: Path) -> tuple[str, str]:
    lower = path.name.lower()
    for ending in (".nii.gz", *_VOLUME_ENDINGS, ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"):
        if lower.endswith(ending):
            return path.name[: -len(ending)], path.name[len(path.name) - len(ending):]
    return path.stem, path.suffix


def _read_volume_if_3d(path: Path):
    """Return the SimpleITK image of a 3D file with more than one slice, else None (a 2D image)."""
    import SimpleITK as sitk

    if not path.name.lower().endswith(_VOLUME_ENDINGS):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    if len(size) < 3 or min(size[:3]) <= 1:
        return None
    return reader.Execute()


def _predict_volume(segmenter, volume_image, path: Path, args, stem: str, ending: str) -> dict:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(volume_image)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a scalar 3D volume, got array shape {array.shape}.")
    array_axis = args.axis
    if isinstance(args.axis, str):
        from MedCLIPSAMLib.geometry import ijk_to_ras_from_itk, slice_axis_for

        ijk_to_ras = ijk_to_ras_from_itk(
            volume_image.GetOrigin(), volume_image.GetSpacing(), volume_image.GetDirection()
        )
        array_axis = slice_axis_for(ijk_to_ras, args.axis, array.shape)
    result = segmenter.segment_volume(array, args.prompt, axis=array_axis)
    outputs = {}
    for key, values in (("mask", result.mask.astype(np.uint8)), ("probability", result.saliency.astype(np.float32))):
        output_image = sitk.GetImageFromArray(values)
        output_image.CopyInformation(volume_image)
        outputs[key] = args.output / f"{stem}_{key}{ending}"
        sitk.WriteImage(output_image, str(outputs[key]), True)
    return {
        "input": str(path),
        "kind": "volume",
        "axis": args.axis,
        "array_axis": array_axis,
        "found_slices": result.found_slices,
        "outputs": {key: value.name for key, value in outputs.items()},
    }


def _predict_image(segmenter, path: Path, args, stem: str) -> dict:
    from PIL import Image

    from MedCLIPSAMLib.io import read_image_with_geometry, write_nrrd

    image, geometry = read_image_with_geometry(path)
    result = segmenter.segment(image, args.prompt)
    outputs = {"mask": args.output / f"{stem}_mask.png"}
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(outputs["mask"])
    if args.probability_format == "png":
        outputs["probability"] = args.output / f"{stem}_probability.png"
        Image.fromarray(np.rint(result.saliency * 255.0).astype(np.uint8)).save(outputs["probability"])
    else:
        outputs["probability"] = args.output / f"{stem}_probability.nrrd"
        write_nrrd(outputs["probability"], result.saliency.astype(np.float32), geometry)
    return {
        "input": str(path),
        "kind": "image",
        "found": bool(result.found),
        "mask_pixels": int(result.mask.sum()),
        "outputs": {key: value.name for key, value in outputs.items()},
    }


def run_weak_predict(args: argparse.Namespace) -> int:
    """Run `medclipsam weak-predict` and return the exit code."""
    from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError
    from MedCLIPSAMLib.weak.predict import WeakSegmenter

    name = "medclipsam weak-predict"
    try:
        segmenter = WeakSegmenter(args.model, device=args.device, threshold=args.threshold, batch_size=args.batch_size)
    except InvalidInputError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MedCLIPSAMError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    args.output.mkdir(parents=True, exist_ok=True)

    failures = 0
    reports = []
    for path in args.inputs:
        stem, ending = _split_ending(path)
        try:
            volume_image = _read_volume_if_3d(path)
            if volume_image is not None:
                reports.append(_predict_volume(segmenter, volume_image, path, args, stem, ending))
            else:
                reports.append(_predict_image(segmenter, path, args, stem))
        except (MedCLIPSAMError, OSError, ValueError, RuntimeError) as error:
            failures += 1
            logger.debug("Prediction for %s failed.", path, exc_info=True)
            print(f"{name}: {path}: failed: {error}", file=sys.stderr)
            continue
        print(f"{name}: {path}: wrote {', '.join(reports[-1]['outputs'].values())}", file=sys.stderr)
    report_path = args.output / "weak_predict.json"
    report_path.write_text(json.dumps({"model": str(args.model), "results": reports}, indent=1) + "\n")
    if failures:
        print(f"{name}: {failures} of {len(args.inputs)} inputs failed.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK

"""Image and mask pairs, network input preparation and augmentation for the weakly supervised U-Net.

Input contract of the network (stored in every checkpoint as ``preprocessing``):

* the image is converted to RGB uint8 by `MedCLIPSAMLib.imaging.to_rgb_uint8` (8-bit data as is, other types
  windowed), averaged over the three channels to grayscale, scaled to [0, 1],
* resized (bilinear, antialiased when shrinking) to a square of ``image_size`` pixels, ignoring the aspect
  ratio, and mapped back to the original size (bilinear) at inference,
* standardised per image: (x - mean) / (std + 1e-6).

Masks are binarised as ``> 0`` (any channel of a colour mask) and resized like the image, then thresholded at
0.5.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from MedCLIPSAMLib.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "NORMALIZATION",
    "Pair",
    "AugmentConfig",
    "SegmentationPairs",
    "augment_pair",
    "file_stem",
    "gray_from_rgb",
    "list_image_files",
    "load_mask",
    "pair_image_mask_files",
    "prepare_gray",
    "resize_mask",
    "resize_gray",
    "standardize",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nrrd", ".nii", ".nii.gz", ".mha")
"""File endings (lower case) that count as images when a folder is listed."""

Pair = tuple[Path, "Path | tuple[Path, ...]"]
"""(image path, mask path or tuple of mask paths whose union is the label)."""

NORMALIZATION = "per_image_zscore"
"""Name of the intensity normalisation that `standardize` applies, stored in checkpoints."""

STANDARDIZE_EPS = 1e-6
"""Added to the standard deviation in `standardize` so that a constant image maps to zeros (unitless)."""


def file_stem(path: str | Path) -> str:
    """Return the file name without its image ending (``.nii.gz`` counts as one ending)."""
    name = Path(path).name
    lower = name.lower()
    for extension in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(extension):
            return name[: -len(extension)]
    return Path(name).stem


def list_image_files(folder: str | Path) -> list[Path]:
    """List the image files directly inside `folder`, sorted by name (hidden files skipped).

    Raises InvalidInputError when the folder is missing or contains no image, or when two images share a stem
    (``a.png`` and ``a.jpg``), because their outputs would overwrite each other.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"Image folder not found: {folder}. Pass an existing folder of images.")
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise InvalidInputError(
            f"No images found in {folder}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    stems: dict[str, Path] = {}
    for path in files:
        stem = file_stem(path)
        if stem in stems:
            raise InvalidInputError(
                f"Images {stems[stem].name} and {path.name} in {folder} share the stem {stem!r}; rename one."
            )
        stems[stem] = path
    return files


def pair_image_mask_files(images_dir: str | Path, masks_dir: str | Path) -> list[Pair]:
    """Pair images with their mask files by name, as every evaluation in MedCLIPSAMLib does.

    Uses `MedCLIPSAMLib.evaluate.pair_images_and_masks`: ``case.jpg`` pairs with ``case.png``, ``case_mask.png``
    and ``case_mask_1.png`` (the union of several mask files is the label), and images without a mask are left
    out with a warning. Returns (image path, mask paths) pairs in natural name order.

    Raises InvalidInputError when a folder is missing or no image has a mask.
    """
    from MedCLIPSAMLib.evaluate import pair_images_and_masks

    pairs = [(pair.image, tuple(pair.masks)) for pair in pair_images_and_masks(images_dir, masks_dir).pairs]
    if not pairs:
        raise InvalidInputError(
            f"No image in {images_dir} has a mask in {masks_dir}; a mask must be named like its image, optionally "
            "with the suffix _mask (case.jpg -> case.png or case_mask.png)."
        )
    return pairs


def prepare_gray(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Convert an image as `read_image` returns it to grayscale float32 [H, W] in [0, 1].

    Uses `to_rgb_uint8` (8-bit data as is, other types windowed with `window` or the 0.5-99.5 percentiles).
    Raises InvalidInputError for a constant non-8-bit image without a window.
    """
    from MedCLIPSAMLib.imaging import to_rgb_uint8

    return gray_from_rgb(to_rgb_uint8(image, window=window))


def gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Average an RGB uint8 image [H, W, 3] to grayscale float32 [H, W] in [0, 1]."""
    return rgb.astype(np.float32).mean(axis=2) / np.float32(255.0)


def load_mask(paths: str | Path | Sequence[str | Path]) -> np.ndarray:
    """Read one mask file, or the union of several, as bool [H, W]: True where any channel is > 0."""
    from MedCLIPSAMLib.io import read_image

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    union = None
    for path in paths:
        mask = np.asarray(read_image(path))
        if mask.ndim == 3:
            mask = (mask > 0).any(axis=2)
        if mask.ndim != 2:
            raise InvalidInputError(f"Mask {path} must be a 2D image, got shape {mask.shape}.")
        if union is not None and union.shape != mask.shape:
            raise InvalidInputError(f"Masks {paths[0]} and {path} differ in size: {union.shape} and {mask.shape}.")
        union = mask > 0 if union is None else union | (mask > 0)
    if union is None:
        raise InvalidInputError("load_mask needs at least one mask file, got none.")
    return union


def resize_gray(gray: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float map [H, W] to `size` (height, width), bilinear, antialiased when shrinking.

    Returns float32 [height, width] on the input's device (CPU for numpy input).
    """
    tensor = torch.as_tensor(np.asarray(gray, dtype=np.float32) if isinstance(gray, np.ndarray) else gray)
    tensor = tensor.float()[None, None]
    shrinking = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return resized[0, 0]


def resize_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a binary mask [H, W] to `size`: bilinear on 0/1, then >= 0.5. Returns bool [height, width]."""
    tensor = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
    return resize_gray(tensor, size) >= 0.5


def standardize(images: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Standardise each image of a batch [..., H, W] to zero mean and unit standard deviation over H and W."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (images - mean) / (std + eps)


@dataclass
class AugmentConfig:
    """Random augmentation of a training pair, drawn anew for each sample and epoch.

    Geometry is kept small because anatomy has a typical pose. Left-right flips are off by default: the heart,
    the liver and the aortic arch are lateral, so a flipped chest or abdomen is an anatomically wrong image,
    and prompts that name a side ("left lung") would teach the wrong label. Turn `flip_lr` on for targets
    without laterality (breast lesions in ultrasound, for example).
    """

    rotation_degrees: float = 10.0
    """Maximum absolute rotation in degrees (uniform)."""
    scale_range: tuple[float, float] = (0.9, 1.1)
    """Zoom factor range (uniform); above 1 crops, below 1 shrinks the image inside the frame."""
    translate_fraction: float = 0.05
    """Maximum shift as a fraction of the image side (uniform, per axis)."""
    flip_lr: bool = False
    """Flip left-right with probability 0.5."""
    brightness: float = 0.1
    """Maximum additive intensity offset on the [0, 1] scale (uniform)."""
    contrast: float = 0.1
    """Maximum relative contrast change around the mean (uniform factor in 1 +- contrast)."""
    gamma_range: tuple[float, float] = (0.8, 1.25)
    """Gamma range applied to the [0, 1] image (log-uniform)."""

    def __post_init__(self) -> None:
        if self.rotation_degrees < 0 or self.translate_fraction < 0 or self.brightness < 0 or self.contrast < 0:
            raise InvalidInputError(f"Augmentation magnitudes must be >= 0, got {self}.")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise InvalidInputError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}.")
        if not 0 < self.gamma_range[0] <= self.gamma_range[1]:
            raise InvalidInputError(f"gamma_range must be (low, high) with 0 < low <= high, got {self.gamma_range}.")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment_pair(
    gray: torch.Tensor, mask: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random augmentation to an image and its mask.

    Args:
        gray: float32 [S, S] in [0, 1].
        mask: float32 or bool [S, S], 0/1.
        config: ranges of the random transforms.
        generator: CPU generator that draws all random numbers (seed it for repeatable runs).

    Returns:
        (gray float32 [S, S] in [0, 1], mask float32 [S, S] 0/1). The mask follows the same affine transform
        (nearest neighbour); intensity changes touch the image only.
    """
    angle = math.radians(_uniform(generator, -config.rotation_degrees, config.rotation_degrees))
    scale = _uniform(generator, *config.scale_range)
    shift_x = _uniform(generator, -config.translate_fraction, config.translate_fraction) * 2.0
    shift_y = _uniform(generator, -config.translate_fraction, config.translate_fraction) * 2.0
    flip = config.flip_lr and float(torch.rand((), generator=generator)) < 0.5

    # affine_grid maps output coordinates (normalised to [-1, 1]) to input coordinates, so the matrix is the
    # inverse of the requested image transform: zooming in by `scale` samples a smaller input region.
    cos_a, sin_a = math.cos(angle) / scale, math.sin(angle) / scale
    flip_sign = -1.0 if flip else 1.0
    theta = torch.tensor(
        [[cos_a * flip_sign, -sin_a, shift_x], [sin_a * flip_sign, cos_a, shift_y]], dtype=torch.float32
    )[None]
    size = (1, 1) + tuple(gray.shape)
    grid = F.affine_grid(theta, list(size), align_corners=False)
    gray = F.grid_sample(gray[None, None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[0, 0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0]

    gamma = math.exp(_uniform(generator, math.log(config.gamma_range[0]), math.log(config.gamma_range[1])))
    gray = gray.clamp(0.0, 1.0) ** gamma
    contrast = _uniform(generator, 1.0 - config.contrast, 1.0 + config.contrast)
    brightness = _uniform(generator, -config.brightness, config.brightness)
    gray = (gray - gray.mean()) * contrast + gray.mean() + brightness
    return gray.clamp(0.0, 1.0), mask


class SegmentationPairs(Dataset):
    """Training or validation samples from (image path, mask path or paths) pairs.

    Each item is ``(image, mask)``: image float32 [1, S, S] standardised (see `standardize`), mask float32
    [1, S, S] with values 0/1, where S is `image_size`. Images and masks are read once and kept in memory at
    S x S (uint8 image plus bool mask, about 1.25 * S * S bytes per pair).

    Args:
        pairs: (image path, mask path) pairs; a tuple of mask paths means the union of those masks.
        image_size: side S of the square network input in pixels.
        augment: random augmentation, or None for the plain resized pair (validation).
        repeats: number of differently augmented copies of each pair in one pass over the data set (more
            steps per epoch on small data sets).
        seed: base seed. Sample ``index`` in epoch ``e`` draws its augmentation from seed, e and index only,
            so runs repeat exactly, with any number of data loader workers or distributed ranks.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        image_size: int,
        augment: AugmentConfig | None = None,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise InvalidInputError("SegmentationPairs needs at least one (image, mask) pair, got none.")
        if image_size < 8:
            raise InvalidInputError(f"image_size must be at least 8 pixels, got {image_size}.")
        if repeats < 1:
            raise InvalidInputError(f"repeats must be at least 1, got {repeats}.")
        self.pairs = [(Path(image), masks) for image, masks in pairs]
        self.image_size = int(image_size)
        self.augment = augment
        self.repeats = int(repeats)
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.pairs) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of `epoch` (call before each epoch, like DistributedSampler)."""
        self.epoch = int(epoch)

    def _load(self, pair_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(pair_index)
        if cached is None:
            from MedCLIPSAMLib.io import read_image

            image_path, mask_path = self.pairs[pair_index]
            image = read_image(image_path)
            mask = load_mask(mask_path)
            if mask.shape != image.shape[:2]:
                raise InvalidInputError(
                    f"Mask {mask_path} has size {mask.shape} but image {image_path} has {image.shape[:2]}; "
                    "a mask must have the image's height and width."
                )
            size = (self.image_size, self.image_size)
            gray = resize_gray(prepare_gray(image), size)
            cached = ((gray * 255.0).round().to(torch.uint8), resize_mask(mask, size))
            self._cache[pair_index] = cached
        return cached

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        gray_u8, mask = self._load(index % len(self.pairs))
        gray = gray_u8.float() / 255.0
        mask = mask.float()
        if self.augment is not None:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
            gray, mask = augment_pair(gray, mask, self.augment, generator)
        return standardize(gray)[None], mask[None]

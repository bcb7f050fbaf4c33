"""Training of the residual U-Net on (pseudo-)masks: loss, split, checkpoints, early stopping, DDP.

The weak-supervision step of MedCLIP-SAM trains a segmentation network on the zero-shot masks of a data set,
validates on the zero-shot masks of a held-out split and evaluates on real ground truth (see `evaluate_weak`).

Distributed training: under ``torchrun`` (environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) `train_weak` joins a process group itself (NCCL when the device is CUDA, gloo otherwise), wraps the
network in DistributedDataParallel and shards the training and validation data across ranks. Rank 0 writes the
checkpoints. A process group that the caller already initialised is used as it is.

Files written to the output folder: ``best.pt`` (best validation Dice), ``last.pt`` (after every epoch, for
``resume``) and ``history.json`` (one record per epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from MedCLIPSAMLib.errors import CancelledError, InvalidInputError, WeightsError
from MedCLIPSAMLib.weak.data import (
    NORMALIZATION,
    AugmentConfig,
    Pair,
    SegmentationPairs,
    pair_image_mask_files,
)
from MedCLIPSAMLib.weak.unet import ResidualUNet

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainResult",
    "WeakTrainConfig",
    "dice_bce_loss",
    "load_checkpoint",
    "make_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "split_pairs",
    "train_on_pairs",
    "train_weak",
]

CHECKPOINT_FORMAT = "medclipsam-weak-unet"
_CHECKPOINT_VERSION = 1
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.json"

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]


@dataclass
class WeakTrainConfig:
    """Settings of one training run (stored in the checkpoints)."""

    epochs: int = 100
    """Maximum number of epochs (passes over the training split times `repeats`)."""
    image_size: int = 256
    """Side of the square network input in pixels."""
    batch_size: int = 8
    """Samples per optimizer step and rank."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam L2 weight decay."""
    base_channels: int = 32
    """U-Net width (channels) at full resolution."""
    depth: int = 4
    """Number of 2x downsamplings of the U-Net."""
    patience: int = 10
    """Stop after this many epochs without a validation Dice gain of more than `min_delta`."""
    min_delta: float = 0.0
    """Smallest validation Dice increase that counts as an improvement (Dice units, 0-1)."""
    val_fraction: float = 0.15
    """Fraction of the pairs held out for validation; 0 validates on the training pairs."""
    seed: int = 0
    """Seed of the split, the initial weights, the shuffling and the augmentation."""
    device: str = "auto"
    """Torch device; "auto" picks cuda > mps > cpu (under torchrun: cuda:LOCAL_RANK)."""
    repeats: int = 1
    """Augmented copies of each training pair per epoch (more steps per epoch on small data sets)."""
    num_workers: int = 0
    """Data loader worker processes (0 loads in the training process and keeps images cached)."""
    threshold: float = 0.5
    """Probability above which a pixel counts as foreground for the validation Dice."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term of the loss."""
    bce_weight: float = 1.0
    """Weight of the binary cross-entropy term of the loss."""
    max_seconds: float | None = None
    """Stop after the first epoch that ends later than this many seconds after the start (None: no limit)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Random augmentation of the training pairs (validation pairs are not augmented)."""

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        positive_ints = ("epochs", "image_size", "batch_size", "base_channels", "depth", "patience", "repeats")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")
        multiple = 2**self.depth
        if self.image_size < 2 * multiple:
            raise InvalidInputError(
                f"image_size must be at least {2 * multiple} pixels for depth {self.depth}, got {self.image_size}."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr}.")
        if not 0.0 < self.threshold < 1.0:
            raise InvalidInputError(f"threshold must be in (0, 1), got {self.threshold}.")
        if self.num_workers < 0:
            raise InvalidInputError(f"num_workers must be >= 0, got {self.num_workers}.")
        if self.dice_weight < 0 or self.bce_weight < 0 or self.dice_weight + self.bce_weight == 0:
            raise InvalidInputError(
                f"dice_weight and bce_weight must be >= 0 and not both 0, got {self.dice_weight}, {self.bce_weight}."
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise InvalidInputError(f"max_seconds must be > 0 or None, got {self.max_seconds}.")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TrainResult:
    """Outcome of `train_weak` / `train_on_pairs`."""

    model: ResidualUNet
    """The trained network on the training device, in eval mode, with the weights of the last epoch."""
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_dice: float
    best_epoch: int
    """Epoch (1-based) of the best validation Dice; 0 when no epoch ran."""
    epochs_completed: int
    stopped_early: bool
    """True when the patience ran out."""
    stop_reason: str
    """"patience", "epochs", "time limit", "cancelled" or "finished before" (resume of a finished run)."""
    history: list[dict[str, float]]


# ----------------------------------------------------------------------------------------------- loss, metric


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Return dice_weight * soft Dice loss + bce_weight * binary cross-entropy, averaged over the batch.

    Args:
        logits: float [B, 1, H, W], unbounded.
        target: float [B, 1, H, W], 0/1.
        smooth: added to the numerator and denominator of the per-image soft Dice (pixels), so an empty target
            with an empty prediction scores a loss near 0.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probability * target).sum(dim=1)
    total = probability.sum(dim=1) + target.sum(dim=1)
    soft_dice = (2.0 * intersection + smooth) / (total + smooth)
    return dice_weight * (1.0 - soft_dice).mean() + bce_weight * bce


def _batch_dice(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice per image of bool masks [B, 1, H, W]; both empty -> 1, one empty -> 0. Returns float [B]."""
    prediction = prediction.flatten(1).float()
    target = target.flatten(1).float()
    total = prediction.sum(dim=1) + target.sum(dim=1)
    intersection = (prediction * target).sum(dim=1)
    return torch.where(total > 0, 2.0 * intersection / total.clamp(min=1.0), torch.ones_like(total))


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    """Write a checkpoint dict with torch.save, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a U-Net checkpoint on the CPU (``weights_only=True``) and check its format.

    Raises WeightsError naming the path and the fix when the file is missing, unreadable or not a checkpoint
    that `train_weak` wrote.
    """
    path = Path(path)
    fix = "Train a network with `medclipsam weak-train --images DIR --masks DIR --output DIR` and pass its best.pt."
    if not path.is_file():
        raise WeightsError(f"U-Net checkpoint not found: {path}. {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise WeightsError(
            f"U-Net checkpoint {path} could not be read ({type(error).__name__}: {error}); the file is corrupt "
            f"or truncated. {fix}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a MedCLIPSAM U-Net checkpoint (no format {CHECKPOINT_FORMAT!r}). {fix}")
    version = checkpoint.get("format_version")
    if version != _CHECKPOINT_VERSION:
        raise WeightsError(
            f"U-Net checkpoint {path} has format version {version}, this MedCLIPSAMLib reads version "
            f"{_CHECKPOINT_VERSION}. {fix}"
        )
    missing = [key for key in ("model_config", "preprocessing", "state_dict") if key not in checkpoint]
    if missing:
        raise WeightsError(f"U-Net checkpoint {path} lacks {', '.join(missing)}. {fix}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "<checkpoint>") -> ResidualUNet:
    """Build the network that a checkpoint dict describes and load its weights (CPU, eval mode)."""
    try:
        model = ResidualUNet(**checkpoint["model_config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError, InvalidInputError) as error:
        raise WeightsError(
            f"U-Net checkpoint {path} does not match its stored model configuration ({error}). Retrain with "
            "`medclipsam weak-train`."
        ) from error
    return model.eval()


def make_checkpoint(
    model: ResidualUNet,
    optimizer: torch.optim.Optimizer,
    config: WeakTrainConfig,
    *,
    epochs_completed: int,
    best_val_dice: float,
    best_epoch: int,
    epochs_without_improvement: int,
    finished: bool,
    history: list[dict[str, float]],
) -> dict:
    """Return the checkpoint dict that `train_weak` saves (and `load_checkpoint` reads) for a model state."""
    train_config = config.to_dict()
    train_config["augment"] = config.augment.to_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": _CHECKPOINT_VERSION,
        "model_config": model.config,
        "preprocessing": {
            "image_size": config.image_size,
            "normalization": NORMALIZATION,
            "channels": "gray",
            "threshold": config.threshold,
        },
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_completed,
        "best_val_dice": best_val_dice,
        "best_epoch": best_epoch,
        "epochs_without_improvement": epochs_without_improvement,
        "finished": finished,
        "train_config": train_config,
        "history": history,
    }


# ----------------------------------------------------------------------------------------------- data split


def split_pairs(
    pairs: Sequence[Pair], val_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, validation) with a seeded permutation.

    The validation split has round(n * val_fraction) pairs, at least 1 when val_fraction > 0, and the
    training split keeps at least 1. val_fraction 0 returns the training pairs as validation pairs too.
    """
    pairs = list(pairs)
    if val_fraction == 0.0:
        return pairs, pairs
    if len(pairs) < 2:
        raise InvalidInputError(
            f"A validation split needs at least 2 image/mask pairs, got {len(pairs)}; add images or set "
            "val_fraction to 0 to validate on the training pairs."
        )
    count = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    val_indices = sorted(order[:count])
    train_indices = sorted(order[count:])
    return [pairs[i] for i in train_indices], [pairs[i] for i in val_indices]


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"Environment variable {name} must be an integer, got {raw!r}.") from None


def _setup_distributed(device_request: str) -> _Distributed:
    """Resolve the device and join (or reuse) the process group that torchrun describes."""
    from MedCLIPSAMLib.models import resolve_device

    device = resolve_device(device_request)
    if dist.is_available() and dist.is_initialized():
        rank, world_size, owns = dist.get_rank(), dist.get_world_size(), False
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        owns = world_size > 1
        if world_size < 1:
            raise InvalidInputError(f"WORLD_SIZE must be at least 1, got {world_size}.")
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"RANK must be in [0, {world_size}), got {rank}.")
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(device)
    if owns:
        # NOTE: the tests run the gloo (CPU) path only; the NCCL path has not been run on a multi-GPU machine.
        backend = "nccl" if device.type == "cuda" else "gloo"
        logger.info("Joining process group: rank %d of %d, backend %s", rank, world_size, backend)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return _Distributed(rank=rank, world_size=world_size, device=device, owns_group=owns)


def _all_reduce_sum(values: list[float], context: _Distributed) -> list[float]:
    if not context.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _broadcast_flag(flag: bool, context: _Distributed) -> bool:
    """Return rank 0's flag on every rank, so that all ranks stop together."""
    if not context.active:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=context.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ----------------------------------------------------------------------------------------------- training


def _validate(
    model: ResidualUNet, dataset: SegmentationPairs, config: WeakTrainConfig, context: _Distributed
) -> tuple[float, float]:
    """Return (mean loss, mean Dice) over the validation pairs; each rank scores every world_size-th pair."""
    model.eval()
    indices = list(range(context.rank, len(dataset), context.world_size))
    loss_sum, dice_sum, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(indices), config.batch_size):
            batch = [dataset[i] for i in indices[start : start + config.batch_size]]
            images = torch.stack([item[0] for item in batch]).to(context.device)
            masks = torch.stack([item[1] for item in batch]).to(context.device)
            logits = model(images)
            loss = dice_bce_loss(logits, masks, dice_weight=config.dice_weight, bce_weight=config.bce_weight)
            loss_sum += float(loss) * len(batch)
            dice_sum += float(_batch_dice(torch.sigmoid(logits) > config.threshold, masks > 0.5).sum())
            count += len(batch)
    loss_sum, dice_sum, count = _all_reduce_sum([loss_sum, dice_sum, count], context)
    return loss_sum / max(count, 1.0), dice_sum / max(count, 1.0)


def _resume_state(output_dir: Path, config: WeakTrainConfig, resume: bool) -> dict | None:
    last = output_dir / LAST_CHECKPOINT
    if not resume:
        if last.exists():
            raise InvalidInputError(
                f"{output_dir} already contains a training run ({last.name}); pass resume=True (--resume) to "
                "continue it or choose an empty output folder."
            )
        return None
    if not last.exists():
        logger.info("No %s in %s; starting a new training run.", LAST_CHECKPOINT, output_dir)
        return None
    checkpoint = load_checkpoint(last)
    stored = checkpoint["model_config"]
    stored_size = checkpoint["preprocessing"]["image_size"]
    if (stored["base_channels"], stored["depth"], stored_size) != (
        config.base_channels,
        config.depth,
        config.image_size,
    ):
        raise InvalidInputError(
            f"Cannot resume {last}: it was trained with base_channels={stored['base_channels']}, "
            f"depth={stored['depth']}, image_size={stored_size}, but this run asks for "
            f"base_channels={config.base_channels}, depth={config.depth}, image_size={config.image_size}. "
            "Use the same settings or a new output folder."
        )
    return checkpoint


def train_on_pairs(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    output_dir: str | Path,
    config: WeakTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> TrainResult:
    """Train the U-Net on explicit training and validation pairs; see `train_weak` for the behaviour.

    Args:
        train_pairs: (image path, mask path or paths) pairs to fit; masks are the (pseudo-)labels.
        val_pairs: pairs that select the best epoch and drive early stopping.
        output_dir: folder for best.pt, last.pt and history.json (created).
        config: training settings (defaults: `WeakTrainConfig()`).
        resume: continue from output_dir/last.pt when it exists (same architecture and image size required).
            Without it, an output folder that already contains last.pt raises InvalidInputError.
        progress: called as progress(epochs_completed, epochs, message) after each epoch (rank 0 only).
        cancel: polled after every optimizer step in a single process, and after every epoch on rank 0 of a
            distributed run. When it returns True, training stops and raises CancelledError. The checkpoints of
            the last completed epoch stay for a resume.
    """
    config = config or WeakTrainConfig()
    if not train_pairs:
        raise InvalidInputError("train_on_pairs needs at least one training pair, got none.")
    if not val_pairs:
        raise InvalidInputError("train_on_pairs needs at least one validation pair, got none.")
    output_dir = Path(output_dir)
    context = _setup_distributed(config.device)
    try:
        return _train(train_pairs, val_pairs, output_dir, config, context, resume, progress, cancel)
    finally:
        if context.owns_group:
            dist.destroy_process_group()


def _train(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    output_dir: Path,
    config: WeakTrainConfig,
    context: _Distributed,
    resume: bool,
    progress: ProgressCallback | None,
    cancel: CancelCallback | None,
) -> TrainResult:
    is_main = context.rank == 0
    previous = _resume_state(output_dir, config, resume)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = ResidualUNet(1, 1, config.base_channels, config.depth)
    model = model.to(context.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, best_val_dice, best_epoch, stale_epochs, history = 0, -math.inf, 0, 0, []
    finished_before = False
    if previous is not None:
        model.load_state_dict(previous["state_dict"])
        optimizer.load_state_dict(previous["optimizer"])
        start_epoch = int(previous["epoch"])
        best_val_dice = float(previous["best_val_dice"])
        best_epoch = int(previous["best_epoch"])
        stale_epochs = int(previous["epochs_without_improvement"])
        history = list(previous.get("history", []))
        finished_before = bool(previous.get("finished", False))
        logger.info("Resuming %s after epoch %d (best validation Dice %.4f at epoch %d)",
                    output_dir / LAST_CHECKPOINT, start_epoch, best_val_dice, best_epoch)
    network: torch.nn.Module = model
    if context.active:
        device_ids = [context.device] if context.device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=device_ids)

    train_set = SegmentationPairs(train_pairs, config.image_size, config.augment, config.repeats, config.seed)
    val_set = SegmentationPairs(val_pairs, config.image_size, None, 1, config.seed)
    sampler = DistributedSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers)
    logger.info("Training on %d pairs (x%d per epoch), validating on %d, device %s, rank %d of %d",
                len(train_pairs), config.repeats, len(val_pairs), context.device, context.rank, context.world_size)

    started = time.monotonic()
    stop_reason = "finished before" if finished_before else "epochs"
    epoch = start_epoch
    while not finished_before and epoch < config.epochs:
        epoch_started = time.monotonic()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        network.train()
        loss_sum, steps = 0.0, 0
        cancelled = False
        for images, masks in loader:
            images, masks = images.to(context.device), masks.to(context.device)
            loss = dice_bce_loss(network(images), masks, dice_weight=config.dice_weight, bce_weight=config.bce_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            steps += 1
            if cancel is not None and not context.active and cancel():
                cancelled = True
                break
        if cancelled:
            stop_reason = "cancelled"
            break
        if context.active:
            # DDP keeps every rank's batch-norm statistics local; rank 0's copy makes the ranks identical.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

        val_loss, val_dice = _validate(model, val_set, config, context)
        epoch += 1
        improved = val_dice > best_val_dice + config.min_delta
        if improved:
            best_val_dice, best_epoch, stale_epochs = val_dice, epoch, 0
        else:
            stale_epochs += 1
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(steps, 1),
            "val_loss": val_loss,
            "val_dice": val_dice,
            "seconds": time.monotonic() - epoch_started,
        }
        history.append(record)
        out_of_patience = stale_epochs >= config.patience
        out_of_time = config.max_seconds is not None and time.monotonic() - started > config.max_seconds
        out_of_time = _broadcast_flag(out_of_time, context)
        stop_cancel = _broadcast_flag(bool(cancel is not None and context.active and is_main and cancel()), context)
        finished = out_of_patience or epoch >= config.epochs

        if is_main:
            state = dict(epochs_completed=epoch, best_val_dice=best_val_dice, best_epoch=best_epoch,
                         epochs_without_improvement=stale_epochs, finished=out_of_patience, history=history)
            checkpoint = make_checkpoint(model, optimizer, config, **state)
            if improved:
                save_checkpoint(output_dir / BEST_CHECKPOINT, checkpoint)
            save_checkpoint(output_dir / LAST_CHECKPOINT, checkpoint)
            (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
            logger.info("Epoch %d: train loss %.4f, validation loss %.4f, validation Dice %.4f%s", epoch,
                        record["train_loss"], val_loss, val_dice, " (best)" if improved else "")
            if progress is not None:
                progress(epoch, config.epochs, f"epoch {epoch}: validation Dice {val_dice:.4f}")
        if out_of_patience:
            stop_reason = "patience"
            break
        if finished:
            break
        if out_of_time:
            stop_reason = "time limit"
            break
        if stop_cancel:
            stop_reason = "cancelled"
            break

    if context.active:
        dist.barrier()
    model.eval()
    if stop_reason == "cancelled":
        raise CancelledError(
            f"Training cancelled after {epoch} completed epoch(s); resume from {output_dir / LAST_CHECKPOINT}."
        )
    return TrainResult(
        model=model,
        best_checkpoint=output_dir / BEST_CHECKPOINT,
        last_checkpoint=output_dir / LAST_CHECKPOINT,
        best_val_dice=best_val_dice if best_epoch > 0 else float("nan"),
        best_epoch=best_epoch,
        epochs_completed=epoch,
        stopped_early=stop_reason == "patience",
        stop_reason=stop_reason,
        history=history,
    )


def train_weak(
    images_dir: str | Path,
    masks_dir: str | Path,
    output_dir: str | Path,
    config: WeakTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> TrainResult:
    """Train the residual U-Net on the images of a folder and their (pseudo-)masks.

    Images and masks are paired by name (`pair_image_mask_files`), and a seeded `config.val_fraction` of the
    pairs is held out for validation. Training uses Adam on Dice + BCE with augmentation and keeps the
    checkpoint of the best validation Dice (threshold `config.threshold`). It stops after `config.patience`
    epochs without improvement, after `config.epochs`, or after the epoch that passes `config.max_seconds`.

    Returns a TrainResult, whose best.pt is the checkpoint to use for prediction. Raises InvalidInputError for
    invalid folders or settings and CancelledError when `cancel` returned True.
    """
    config = config or WeakTrainConfig()
    pairs = pair_image_mask_files(images_dir, masks_dir)
    train_pairs, val_pairs = split_pairs(pairs, config.val_fraction, config.seed)
    return train_on_pairs(
        train_pairs, val_pairs, output_dir, config, resume=resume, progress=progress, cancel=cancel
    )

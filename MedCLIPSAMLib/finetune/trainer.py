"""Fine-tuning of BiomedCLIP on image-caption pairs with DHN-NCE (or HN-NCE, DCL, InfoNCE).

`finetune_clip` reads a caption CSV, splits it 85/15 with a seed, trains the whole model (both towers) with
AdamW at a fixed loss temperature, evaluates the validation loss before training and after every epoch, and
writes to the output folder:

* ``model/``: the epoch with the lowest validation loss as an open_clip ``local-dir`` folder
  (``open_clip_config.json``, ``open_clip_model.safetensors``, tokenizer files, the text encoder's
  ``config.json``), loadable by ``open_clip.create_model_from_pretrained("local-dir:...")``, by
  `MedCLIPSAMLib.models.load_clip` and by ``medclipsam segment --clip``;
* ``checkpoint.pt``: the last epoch's model, optimizer, scheduler, RNG states and history, for ``--resume``;
* ``history.csv`` and ``history.json``: training and validation loss and learning rate per epoch;
* ``split.json``: the CSV lines of the training and validation pairs.

Learning-rate schedule: the MedCLIP-SAM paper gives "1e-6 with 50 % decay". Here that is ``StepLR`` of
`torch.optim.lr_scheduler` with ``gamma = lr_decay = 0.5``, stepped at the end of every ``lr_decay_epochs = 1``
epochs, so epoch e (1-based) trains at ``lr * 0.5 ** ((e - 1) // lr_decay_epochs)``. The paper does not name the
optimizer, so the default here is AdamW without weight decay.

The batch size is the global batch: with W processes each rank takes ``batch_size / W`` pairs, and the loss of
every rank uses the negatives of all W ranks (see `MedCLIPSAMLib.finetune.distributed`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from MedCLIPSAMLib.errors import CancelledError, InvalidInputError, WeightsError
from MedCLIPSAMLib.finetune.data import (
    DEFAULT_MIN_CAPTION_LENGTH,
    DEFAULT_VALIDATION_FRACTION,
    ImageCaptionDataset,
    build_preprocess,
    fingerprint_pairs,
    read_caption_csv,
    split_pairs,
)
from MedCLIPSAMLib.finetune.distributed import (
    DistributedContext,
    all_gather_variable,
    average_across_ranks,
    barrier,
    global_batch_loss,
    init_distributed,
)
from MedCLIPSAMLib.finetune.losses import DEFAULT_BETA, DEFAULT_TEMPERATURE, LOSS_NAMES, ContrastiveLoss

__all__ = [
    "CHECKPOINT_NAME",
    "MODEL_FOLDER_NAME",
    "EpochRecord",
    "FinetuneConfig",
    "FinetuneResult",
    "encode_pairs",
    "finetune_clip",
    "load_trainable_clip",
    "save_clip_folder",
    "validation_loss",
]

logger = logging.getLogger(__name__)

MODEL_FOLDER_NAME = "model"
CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_CSV_NAME = "history.csv"
HISTORY_JSON_NAME = "history.json"
SPLIT_NAME = "split.json"
_CHECKPOINT_FORMAT = 1

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run; the defaults are the MedCLIP-SAM paper's where it gives them."""

    loss: str = "dhn-nce"
    temperature: float = DEFAULT_TEMPERATURE
    beta_image_to_text: float = DEFAULT_BETA
    beta_text_to_image: float = DEFAULT_BETA
    learning_rate: float = 1e-6
    lr_decay: float = 0.5
    """Factor applied to the learning rate every `lr_decay_epochs` epochs (0.5: the MedCLIP-SAM paper's 50 % decay)."""
    lr_decay_epochs: int = 1
    weight_decay: float = 0.0
    epochs: int = 10
    """Number of training epochs (the MedCLIP-SAM paper does not state it)."""
    batch_size: int = 64
    """Global batch size in image-caption pairs, split evenly over the processes."""
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    seed: int = 0
    num_workers: int = 0
    """DataLoader worker processes per rank that decode images (0: decode in the training process)."""
    image_column: str | None = None
    caption_column: str | None = None
    min_caption_length: int = DEFAULT_MIN_CAPTION_LENGTH

    def validate(self) -> None:
        """Raise `InvalidInputError` naming the first invalid setting."""
        if self.loss.strip().lower().replace("_", "-") not in LOSS_NAMES:
            raise InvalidInputError(f"Unknown loss {self.loss!r}; use one of {', '.join(LOSS_NAMES)}.")
        checks = [
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.beta_image_to_text >= 0, f"beta_image_to_text must be >= 0, got {self.beta_image_to_text}"),
            (self.beta_text_to_image >= 0, f"beta_text_to_image must be >= 0, got {self.beta_text_to_image}"),
            (self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}"),
            (0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}"),
            (self.lr_decay_epochs >= 1, f"lr_decay_epochs must be >= 1, got {self.lr_decay_epochs}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (
                self.batch_size >= 2,
                f"batch size must be >= 2 (a contrastive loss needs negatives), got {self.batch_size}",
            ),
            (
                0 < self.validation_fraction < 1,
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}",
            ),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.min_caption_length >= 0, f"min_caption_length must be >= 0, got {self.min_caption_length}"),
        ]
        for valid, message in checks:
            if not valid:
                raise InvalidInputError(message + ".")


@dataclass
class EpochRecord:
    """Losses of one epoch; epoch 0 is the validation of the starting model, before any training step."""

    epoch: int
    train_loss: float | None
    validation_loss: float
    learning_rate: float | None
    seconds: float


@dataclass
class FinetuneResult:
    """Outcome of `finetune_clip`: where the best model is and how the losses went."""

    output_dir: Path
    model_dir: Path
    checkpoint_path: Path
    best_epoch: int
    best_validation_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    train_pairs: int = 0
    validation_pairs: int = 0


# --------------------------------------------------------------------------------------------------------------
# Model loading and saving


def load_trainable_clip(
    clip_id: str, device: torch.device, models_dir: str | Path | None = None
) -> tuple[torch.nn.Module, Any]:
    """Load a CLIP model as a private, trainable copy.

    The shared model that `MedCLIPSAMLib.models.load_clip` caches stays untouched (eval mode, frozen). The copy
    is in train mode with gradients on every parameter except ``logit_scale`` and ``logit_bias``, which the
    fixed-temperature losses do not use.

    Returns:
        ``(model, bundle)``: the float32 copy on `device` and the `ClipBundle` of the source (tokenizer,
        mean, std, image size, canonical model id).
    """
    from MedCLIPSAMLib.models import copy_clip_bundle, load_clip

    bundle = copy_clip_bundle(load_clip(clip_id, device=device, dtype=torch.float32, models_dir=models_dir))
    model = bundle.model
    model.requires_grad_(True)
    for name in ("logit_scale", "logit_bias"):
        parameter = getattr(model, name, None)
        if isinstance(parameter, torch.nn.Parameter):
            parameter.requires_grad_(False)
    model.train()
    return model, bundle


def _source_open_clip_config(model_id: str) -> dict[str, Any]:
    """Read the open_clip_config.json of a canonical model id (``local-dir:<folder>`` or ``hf-hub:<repo>``)."""
    if model_id.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo_id=model_id[len("hf-hub:") :], filename="open_clip_config.json"))
        except OSError as error:
            raise WeightsError(
                f"Cannot read open_clip_config.json of {model_id} from the Hugging Face cache ({error}); prepare "
                "an offline copy with `medclipsam models download` and pass it with --clip local-dir:FOLDER."
            ) from error
    else:
        folder = Path(model_id[len("local-dir:") :] if model_id.startswith("local-dir:") else model_id)
        path = folder / "open_clip_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"Cannot read the open_clip config {path}: {error}") from error


def save_clip_folder(
    model: torch.nn.Module,
    tokenizer: Any,
    source_model_id: str,
    folder: str | Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as an open_clip ``local-dir`` folder that loads with no network.

    The folder gets the source's ``open_clip_config.json`` with the text tower's ``hf_model_name`` and
    ``hf_tokenizer_name`` pointing at the folder itself, the weights as ``open_clip_model.safetensors``, the
    tokenizer files and the text encoder's ``config.json``. `metadata` is stored under the config's
    ``medclipsam_finetune`` key, which open_clip ignores. The folder is written next to its final place and then
    swapped in, so an interrupted save leaves the previous folder intact.

    NOTE: plain open_clip resolves ``hf_model_name`` as written, so it stops loading a moved folder until that
    path is updated. `load_clip` still loads it, because it falls back to the ``config.json`` inside the folder.

    Returns:
        The folder as an absolute path.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser().resolve()
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    config = copy.deepcopy(_source_open_clip_config(source_model_id))
    model_cfg = config.setdefault("model_cfg", {})
    text_cfg = model_cfg.get("text_cfg", {})
    text_tower = getattr(model, "text", None)
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_name"] = str(folder)
        text_cfg["hf_tokenizer_name"] = str(folder)
        text_cfg.pop("hf_model_pretrained", None)
        text_config = getattr(text_tower, "config", None)
        if text_config is None:
            raise WeightsError(f"The text tower of {source_model_id} has no Hugging Face config to save.")
        text_config.save_pretrained(str(staging))
    if "timm_model_pretrained" in model_cfg.get("vision_cfg", {}):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    config["medclipsam_finetune"] = {"source_model": source_model_id, **(metadata or {})}
    (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(staging))
    # Cloned tensors: safetensors rejects tensors that share storage.
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(staging / "open_clip_model.safetensors"))

    if folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(folder, previous)
        os.replace(staging, folder)
        shutil.rmtree(previous)
    else:
        os.replace(staging, folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Embedding and validation


def _model_features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """Run the CLIP forward (through DDP when wrapped) and return L2-normalised [B, D] image and text features."""
    output = model(images, tokens)
    if isinstance(output, dict):
        return output["image_features"], output["text_features"]
    return output[0], output[1]


@torch.no_grad()
def encode_pairs(
    model: torch.nn.Module, loader: DataLoader, context: DistributedContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every pair of a loader (each rank its shard) and gather the results of all ranks.

    Pass the unwrapped model, not the DDP wrapper: DDP's forward broadcasts buffers, a collective call.

    Returns:
        ``(indices [N] int64, image_features [N, D] float32, text_features [N, D] float32)`` on the CPU, sorted
        by dataset index with duplicates (padding of `DistributedSampler`) removed; the same on every rank.
    """
    was_training = model.training
    model.eval()
    indices, images_out, texts_out = [], [], []
    for images, tokens, index in loader:
        image_features, text_features = _model_features(
            model, images.to(context.device, non_blocking=True), tokens.to(context.device, non_blocking=True)
        )
        indices.append(index.to(context.device))
        images_out.append(image_features.float())
        texts_out.append(text_features.float())
    model.train(was_training)

    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=context.device)
    dimension = images_out[0].shape[1] if images_out else 0
    empty = torch.zeros(0, dimension, device=context.device)
    all_indices = all_gather_variable(local_indices, context).cpu()
    all_images = all_gather_variable(torch.cat(images_out) if images_out else empty, context).cpu()
    all_texts = all_gather_variable(torch.cat(texts_out) if texts_out else empty, context).cpu()

    order = torch.argsort(all_indices, stable=True)
    all_indices, all_images, all_texts = all_indices[order], all_images[order], all_texts[order]
    keep = torch.ones_like(all_indices, dtype=torch.bool)
    keep[1:] = all_indices[1:] != all_indices[:-1]
    return all_indices[keep], all_images[keep], all_texts[keep]


def validation_loss(
    loss: ContrastiveLoss, image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int
) -> float:
    """Return the pair-weighted mean loss over consecutive batches of `batch_size` pairs, in dataset order.

    A last batch of a single pair, which has no negative, is merged into the batch before it.

    Args:
        image_features, text_features: [N, D] L2-normalised embeddings of all validation pairs, N >= 2.
    """
    count = image_features.shape[0]
    if count < 2:
        raise InvalidInputError(f"The validation loss needs at least 2 pairs, got {count}.")
    starts = list(range(0, count, batch_size))
    if count - starts[-1] == 1:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [count]))
    total = 0.0
    for start, stop in bounds:
        total += float(loss(image_features[start:stop], text_features[start:stop])) * (stop - start)
    return total / count


# --------------------------------------------------------------------------------------------------------------
# Random number generators and checkpoints


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Return the RNG states as tensors and plain values, so that ``torch.load(weights_only=True)`` reads them."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "numpy_has_gauss": int(numpy_state[3]),
        "numpy_cached_gaussian": float(numpy_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_position"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(context: DistributedContext) -> list[dict[str, Any]]:
    state = _rng_state()
    if not context.is_distributed:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _write_history(output_dir: Path, history: list[EpochRecord], summary: dict[str, Any]) -> None:
    with open(output_dir / HISTORY_CSV_NAME, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "validation_loss", "learning_rate", "seconds"])
        for record in history:
            writer.writerow(
                [
                    record.epoch,
                    "" if record.train_loss is None else f"{record.train_loss:.6f}",
                    f"{record.validation_loss:.6f}",
                    "" if record.learning_rate is None else f"{record.learning_rate:.6g}",
                    f"{record.seconds:.2f}",
                ]
            )
    payload = {**summary, "history": [asdict(record) for record in history]}
    (output_dir / HISTORY_JSON_NAME).write_text(json.dumps(payload, indent=2), encoding="utf-8")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidInputError(f"Checkpoint to resume from not found: {path}; pass OUTPUT/{CHECKPOINT_NAME}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise WeightsError(f"Cannot read the checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a checkpoint written by medclipsam finetune (format {_CHECKPOINT_FORMAT}).")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# Training


def _build_loaders(train_set, validation_set, config: FinetuneConfig, context: DistributedContext):
    local_batch = config.batch_size // context.world_size
    train_sampler = DistributedSampler(
        train_set,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
        drop_last=True,
    )
    samples_per_rank = len(train_sampler)

    if samples_per_rank < 2:
        raise InvalidInputError(
            f"{len(train_set)} training pairs give each of the {context.world_size} processes {samples_per_rank}; "
            "every process needs at least 2. Add pairs or use fewer processes."
        )
    # Drop the last incomplete batch unless the whole shard is smaller than one batch (then it is the only batch).
    drop_last = samples_per_rank >= local_batch
    if samples_per_rank < local_batch:
        logger.warning(
            "Only %d training pairs per process, fewer than the batch of %d: each epoch is one batch of %d.",
            samples_per_rank,
            local_batch,
            samples_per_rank,
        )

    pin = context.device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=train_sampler,
        drop_last=drop_last,
        num_workers=config.num_workers,
        pin_memory=pin,
        persistent_workers=config.num_workers > 0,
    )

    validation_sampler = DistributedSampler(
        validation_set, num_replicas=context.world_size, rank=context.rank, shuffle=False, drop_last=False
    )
    validation_loader = DataLoader(
        validation_set,
        batch_size=local_batch,
        sampler=validation_sampler,
        num_workers=config.num_workers,
        pin_memory=pin,
    )
    return train_sampler, train_loader, validation_loader


def finetune_clip(
    data_csv: str | Path,
    output_dir: str | Path,
    *,
    clip_id: str | None = None,
    config: FinetuneConfig | None = None,
    device: str | torch.device = "auto",
    resume: str | Path | None = None,
    overwrite: bool = False,
    models_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> FinetuneResult:
    """Fine-tune a CLIP model on the image-caption pairs of a CSV file (see the module docstring for outputs).

    Runs single-process, or as one rank of a torchrun job when torchrun's environment variables are set. Only
    rank 0 writes files and reports progress, and every rank returns the same result.

    Args:
        data_csv: CSV of image paths and captions (see `MedCLIPSAMLib.finetune.data.read_caption_csv`).
        output_dir: Output folder; created if missing.
        clip_id: Starting model: ``hf-hub:<repo>``, ``local-dir:<folder>`` or a folder; default BiomedCLIP.
        config: Training settings; default `FinetuneConfig()` (the MedCLIP-SAM paper's settings).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; torchrun ranks on CUDA use GPU LOCAL_RANK.
        resume: ``checkpoint.pt`` of an earlier run on the same data and settings; training continues after
            its last completed epoch with its model, optimizer, scheduler and RNG states.
        overwrite: Allow an output folder that already holds a checkpoint when not resuming.
        models_dir: Models folder for `load_clip`.
        progress: ``progress(done, total, message)`` after every training step (rank 0 only).
        cancel: Polled before every step; when it returns True, the run stops with `CancelledError`, and the
            output folder keeps the last completed epoch.

    Raises:
        InvalidInputError: invalid settings or data, or a checkpoint from other data.
        WeightsError: the starting model or the checkpoint cannot be read.
        CancelledError: `cancel` returned True.
    """
    from MedCLIPSAMLib.models import DEFAULT_CLIP_ID, resolve_device

    config = copy.deepcopy(config) if config is not None else FinetuneConfig()
    config.loss = config.loss.strip().lower().replace("_", "-")
    config.validate()
    clip_id = clip_id or DEFAULT_CLIP_ID
    output_dir = Path(output_dir).expanduser().resolve()
    checkpoint_path = output_dir / CHECKPOINT_NAME
    if resume is None and checkpoint_path.exists() and not overwrite:
        raise InvalidInputError(
            f"{output_dir} already contains a fine-tuning run ({CHECKPOINT_NAME}); resume it with --resume "
            f"{checkpoint_path}, choose another output folder, or pass --overwrite."
        )
    checkpoint = _load_checkpoint(Path(resume).expanduser()) if resume is not None else None

    context = init_distributed(resolve_device(device))
    if context.world_size > 1 and config.batch_size % context.world_size != 0:
        raise InvalidInputError(
            f"The global batch size {config.batch_size} is not divisible by the {context.world_size} processes; "
            "pick a multiple of the process count."
        )

    table = read_caption_csv(
        data_csv,
        image_column=config.image_column,
        caption_column=config.caption_column,
        min_caption_length=config.min_caption_length,
    )
    train_pairs, validation_pairs = split_pairs(
        table.pairs, validation_fraction=config.validation_fraction, seed=config.seed
    )
    fingerprint = fingerprint_pairs(table.pairs)
    if context.is_main:
        logger.info(
            "%d pairs (%d rows, %d dropped with short captions): %d training, %d validation",
            len(table.pairs),
            table.rows_read,
            table.dropped_short,
            len(train_pairs),
            len(validation_pairs),
        )

    model, bundle = load_trainable_clip(clip_id, context.device, models_dir)
    # Seeded after loading: building an uncached model draws from the global RNG, a cached one does not.
    _seed_everything(config.seed + context.rank)
    preprocess = build_preprocess(bundle.image_size, bundle.mean, bundle.std)
    train_set = ImageCaptionDataset(train_pairs, preprocess, bundle.tokenizer)
    validation_set = ImageCaptionDataset(validation_pairs, preprocess, bundle.tokenizer)
    train_sampler, train_loader, validation_loader = _build_loaders(train_set, validation_set, config, context)

    loss = ContrastiveLoss(
        config.loss,
        temperature=config.temperature,
        beta_image_to_text=config.beta_image_to_text,
        beta_text_to_image=config.beta_text_to_image,
    )
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_epochs, gamma=config.lr_decay)

    history: list[EpochRecord] = []
    best_epoch, best_loss = 0, math.inf
    start_epoch = 1
    if checkpoint is not None:
        if checkpoint["data_fingerprint"] != fingerprint:
            raise InvalidInputError(
                f"The checkpoint {resume} was trained on other pairs than {data_csv} gives now (different CSV, "
                "paths or cleaning); start a new run instead of resuming."
            )
        changed = [
            name
            for name, value in asdict(config).items()
            if name not in ("epochs", "num_workers") and checkpoint["config"].get(name) != value
        ]
        if changed and context.is_main:
            logger.warning("Resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = [EpochRecord(**record) for record in checkpoint["history"]]
        best_epoch, best_loss = int(checkpoint["best_epoch"]), float(checkpoint["best_validation_loss"])
        start_epoch = int(checkpoint["epoch"]) + 1
        states = checkpoint["rng_states"]
        if len(states) == context.world_size:
            _restore_rng_state(states[context.rank])
        else:
            logger.warning(
                "The checkpoint was written by %d processes, this run has %d: RNG states are re-seeded.",
                len(states),
                context.world_size,
            )
            _seed_everything(config.seed + context.rank + 1000 * start_epoch)
        if context.is_main:
            logger.info("Resuming from %s after epoch %d", resume, start_epoch - 1)

    if context.is_distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[context.device.index] if context.device.type == "cuda" else None,
            # Every trainable parameter of open_clip's BiomedCLIP architecture gets a gradient (checked on the
            # tiny model of the same architecture), so DDP need not search for unused ones.
            find_unused_parameters=False,
        )

    summary = {
        "source_model": bundle.model_id,
        "data_csv": str(Path(data_csv).expanduser().resolve()),
        "config": asdict(config),
        "world_size": context.world_size,
        "pairs": len(table.pairs),
        "rows_read": table.rows_read,
        "dropped_short_captions": table.dropped_short,
        "train_pairs": len(train_pairs),
        "validation_pairs": len(validation_pairs),
    }
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        split = {
            "train_lines": [pair.line for pair in train_pairs],
            "validation_lines": [pair.line for pair in validation_pairs],
        }
        (output_dir / SPLIT_NAME).write_text(json.dumps(split), encoding="utf-8")

    if not history:
        started = time.perf_counter()
        _, image_features, text_features = encode_pairs(_unwrap(model), validation_loader, context)
        baseline = validation_loss(loss, image_features, text_features, config.batch_size)
        history.append(EpochRecord(0, None, baseline, None, time.perf_counter() - started))
        if context.is_main:
            logger.info("Epoch 0 (starting model): validation loss %.4f", baseline)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * max(0, config.epochs - start_epoch + 1)
    done_steps = 0
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        train_sampler.set_epoch(epoch)
        model.train()
        learning_rate = optimizer.param_groups[0]["lr"]
        step_losses = []
        for images, tokens, _ in train_loader:
            if cancel is not None and cancel():
                raise CancelledError(
                    f"Fine-tuning cancelled in epoch {epoch}; {output_dir} keeps the last completed epoch."
                )
            images = images.to(context.device, non_blocking=True)
            tokens = tokens.to(context.device, non_blocking=True)
            image_features, text_features = _model_features(model, images, tokens)
            batch_loss = global_batch_loss(loss, image_features, text_features, context)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            step_losses.append(float(batch_loss.detach()))
            done_steps += 1
            if progress is not None and context.is_main:
                progress(done_steps, total_steps, f"epoch {epoch}/{config.epochs} loss {step_losses[-1]:.4f}")
        scheduler.step()
        train_loss = average_across_ranks(sum(step_losses) / max(1, len(step_losses)), context)

        _, image_features, text_features = encode_pairs(_unwrap(model), validation_loader, context)
        epoch_validation = validation_loss(loss, image_features, text_features, config.batch_size)
        record = EpochRecord(epoch, train_loss, epoch_validation, learning_rate, time.perf_counter() - started)
        history.append(record)
        improved = epoch_validation < best_loss
        if improved:
            best_epoch, best_loss = epoch, epoch_validation

        rng_states = _gather_rng_states(context)
        if context.is_main:
            logger.info(
                "Epoch %d/%d: train loss %.4f, validation loss %.4f, lr %.3g%s",
                epoch,
                config.epochs,
                train_loss,
                epoch_validation,
                learning_rate,
                " (best so far)" if improved else "",
            )
            if improved:
                metadata = {
                    "loss": config.loss,
                    "epoch": epoch,
                    "validation_loss": epoch_validation,
                    "temperature": config.temperature,
                    "beta_image_to_text": config.beta_image_to_text,
                    "beta_text_to_image": config.beta_text_to_image,
                }
                save_clip_folder(
                    _unwrap(model), bundle.tokenizer, bundle.model_id, output_dir / MODEL_FOLDER_NAME, metadata
                )
            state = {
                "format": _CHECKPOINT_FORMAT,
                "epoch": epoch,
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_states": rng_states,
                "history": [asdict(item) for item in history],
                "best_epoch": best_epoch,
                "best_validation_loss": best_loss,
                "data_fingerprint": fingerprint,
                "source_model": bundle.model_id,
                "config": asdict(config),
            }
            partial = checkpoint_path.with_name(checkpoint_path.name + ".partial")
            torch.save(state, partial)
            os.replace(partial, checkpoint_path)
            _write_history(
                output_dir, history, {**summary, "best_epoch": best_epoch, "best_validation_loss": best_loss}
            )
        barrier(context)

    if context.is_main and start_epoch > config.epochs:
        logger.warning("The checkpoint already covers all %d epochs; nothing to train.", config.epochs)
    return FinetuneResult(
        output_dir=output_dir,
        model_dir=output_dir / MODEL_FOLDER_NAME,
        checkpoint_path=checkpoint_path,
        best_epoch=best_epoch,
        best_validation_loss=best_loss,
        history=history,
        train_pairs=len(train_pairs),
        validation_pairs=len(validation_pairs),
    )

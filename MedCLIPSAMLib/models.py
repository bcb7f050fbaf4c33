"""Devices, BiomedCLIP and SAM loading with a per-process cache, checkpoint download and model listing.

Model sources:

* BiomedCLIP through open_clip: ``hf-hub:<repo>`` (the Hugging Face cache, or a prepared copy in the models
  folder), ``local-dir:<folder>`` or a plain folder path holding ``open_clip_config.json``, the weights and the
  tokenizer files.
* SAM through segment-anything: the official ``vit_b``/``vit_l``/``vit_h`` checkpoints (downloaded once into
  ``<models folder>/sam/`` with a SHA-256 check), MedSAM (``vit_b`` architecture, local file only) and the
  ``tiny`` test architecture of `MedCLIPSAMLib.tiny`.

Every missing, partial or corrupt weights file raises one `WeightsError` that states what is missing, where it was
looked for and how to supply it. Nothing falls back to random weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import InvalidInputError, WeightsError

__all__ = [
    "DEFAULT_CLIP_ID",
    "SAM_TYPES",
    "ClipBundle",
    "clear_model_cache",
    "copy_clip_bundle",
    "cpu_flags",
    "default_models_dir",
    "download_models",
    "download_sam_checkpoint",
    "list_models",
    "load_clip",
    "load_sam",
    "native_bfloat16",
    "resolve_device",
    "sam_checkpoint_path",
]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SAM_TYPES = ("vit_b", "vit_l", "vit_h", "medsam", "tiny")
TINY_CLIP_ID = "tiny"
"""CLIP id of the tiny random-weight test model, built on first use in ``<models_dir>/tiny-biomedclip``.

Together with SAM type ``tiny`` without a checkpoint, it lets the whole pipeline run with no download, for smoke
tests and the Slicer self-test. Their masks and saliency maps mean nothing medically.
"""
TINY_CLIP_FOLDER_NAME = "tiny-biomedclip"
TINY_SAM_FILE_NAME = "sam_tiny.pth"

ProgressCallback = Callable[[int, int, str], None]

# Sub-folders of the models folder.
CLIP_FOLDER_NAME = "biomedclip"
SAM_FOLDER_NAME = "sam"
MANIFEST_NAME = "manifest.json"
# Sub-folder of a prepared CLIP folder that contains the text encoder's config.json.
TEXT_ENCODER_FOLDER_NAME = "text_encoder"

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
SAM_BASE_URL_ENV = "MEDCLIPSAM_SAM_BASE_URL"
MODELS_DIR_ENV = "MEDCLIPSAM_MODELS_DIR"
MEDSAM_SOURCE = "https://github.com/bowang-lab/MedSAM (checkpoint link in its README)"


@dataclass(frozen=True)
class SamCheckpointInfo:
    """Checkpoint file of one SAM model type.

    ``sha256`` is the published SHA-256 of the official file. The values of the three Meta checkpoints agree
    across several independent public projects that verify these downloads, for example micro_sam and a 3D
    Slicer SAM extension. ``downloadable`` is False where no stable public URL exists.
    """

    architecture: str
    filename: str
    sha256: str | None
    downloadable: bool


SAM_CHECKPOINTS: dict[str, SamCheckpointInfo] = {
    "vit_b": SamCheckpointInfo(
        "vit_b", "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", True
    ),
    "vit_l": SamCheckpointInfo(
        "vit_l", "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", True
    ),
    "vit_h": SamCheckpointInfo(
        "vit_h", "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", True
    ),
    "medsam": SamCheckpointInfo("vit_b", "medsam_vit_b.pth", None, False),
}

# Image-encoder width (channels of image_encoder.patch_embed.proj.weight) of each SAM architecture, used to tell
# the user which --sam-type a mismatched checkpoint belongs to.
_SAM_ENCODER_WIDTHS = {768: "vit_b (or medsam)", 1024: "vit_l", 1280: "vit_h", 64: "tiny"}

_CLIP_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HASH_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0

_cache_lock = threading.RLock()
_clip_cache: dict[tuple[str, str, torch.dtype], "ClipBundle"] = {}
_sam_cache: dict[tuple[Any, ...], torch.nn.Module] = {}


# --------------------------------------------------------------------------------------------------------------
# Devices and folders


def _available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a `torch.device` that exists on this machine.

    Args:
        device: ``"auto"`` (CUDA if present, else Apple MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"`` or a `torch.device`.

    Raises:
        InvalidInputError: the device is unknown or not available here; the message lists the available ones.
    """
    if isinstance(device, torch.device):
        request = str(device)
    elif isinstance(device, str):
        request = device.strip().lower()
    else:
        raise InvalidInputError(f"Invalid device {device!r}: pass 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")

    available = _available_devices()
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if "mps" in available:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        parsed = torch.device(request)
    except RuntimeError as error:
        raise InvalidInputError(
            f"Invalid device {device!r}: pass 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. Available here: "
            f"{', '.join(available)}."
        ) from error

    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda" and torch.cuda.is_available():
        # An explicit index keeps "cuda" and "cuda:0" on one cache entry.
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        if index < torch.cuda.device_count():
            return torch.device("cuda", index)
    elif parsed.type == "mps" and "mps" in available:
        return parsed
    raise InvalidInputError(
        f"Device {device!r} is not available on this machine. Available devices: {', '.join(available)}; "
        "pass one of them or 'auto'."
    )


CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with bfloat16 matrix-product instructions (Intel Cooper Lake and Sapphire Rapids
onwards, AMD Zen 4 onwards). Without them oneDNN emulates bfloat16, which is slower than float32."""


def cpu_flags() -> set[str]:
    """Return the feature flags of the first processor in /proc/cpuinfo; empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(device: str | torch.device) -> bool:
    """Return True when `device` computes bfloat16 matrix products in hardware, faster than float32.

    CUDA: compute capability 8.0 or higher (Ampere onwards). CPU: one of `CPU_BFLOAT16_FLAGS` in /proc/cpuinfo,
    so only Linux on x86 qualifies. Apple MPS: False (not measured).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_flags() & set(CPU_BFLOAT16_FLAGS))
    return False


def default_models_dir() -> Path:
    """Return the models folder: ``$MEDCLIPSAM_MODELS_DIR`` if set, else ``~/.cache/medclipsam``."""
    configured = os.environ.get(MODELS_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "medclipsam"


def _models_dir(models_dir: str | Path | None) -> Path:
    return Path(models_dir).expanduser() if models_dir is not None else default_models_dir()


def sam_checkpoint_path(model_type: str, models_dir: str | Path | None = None) -> Path:
    """Return where the checkpoint of an official SAM type, MedSAM or the tiny test model lives in the models folder."""
    if model_type == "tiny":
        return _models_dir(models_dir) / SAM_FOLDER_NAME / TINY_SAM_FILE_NAME
    if model_type not in SAM_CHECKPOINTS:
        raise InvalidInputError(
            f"SAM type {model_type!r} has no checkpoint file in the models folder; "
            f"use one of {', '.join(SAM_CHECKPOINTS)}."
        )
    return _models_dir(models_dir) / SAM_FOLDER_NAME / SAM_CHECKPOINTS[model_type].filename


def clear_model_cache() -> None:
    """Forget every cached CLIP and SAM model so that the next load reads the files again."""
    with _cache_lock:
        _clip_cache.clear()
        _sam_cache.clear()


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# BiomedCLIP


@dataclass
class ClipBundle:
    """A loaded CLIP model with what is needed to feed it.

    The model is shared through the process cache: it is in eval mode with ``requires_grad=False`` on every
    parameter. Gradient-based saliency must request gradients on the input or on hooked activations, and
    training code must work on a copy (`copy.deepcopy`).

    Attributes:
        model: open_clip ``CustomTextCLIP``; ``model.visual.trunk`` is a timm VisionTransformer.
        tokenizer: callable ``list[str] -> LongTensor [N, context_length]`` (on CPU).
        mean, std: per-channel RGB normalisation of inputs scaled to [0, 1].
        image_size: side of the square model input in pixels (224 for BiomedCLIP).
        model_id: canonical source, ``local-dir:<absolute folder>`` or ``hf-hub:<repo>``.
        device, dtype: where the parameters live and their floating-point type.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    model_id: str
    device: torch.device
    dtype: torch.dtype


def _hub_repo(model_id: str) -> str | None:
    return model_id[len("hf-hub:"):].strip("/") if model_id.startswith("hf-hub:") else None


def _clip_folder_name(repo: str) -> str:
    """Folder name of a prepared copy of a hub model inside the models folder."""
    if repo == _hub_repo(DEFAULT_CLIP_ID):
        return CLIP_FOLDER_NAME
    return repo.replace("/", "--")


def _download_hint(models_dir: Path) -> str:
    return (
        f"Run `medclipsam models download --models-dir {models_dir}` on a machine with internet access and copy "
        f"that folder here (or set {MODELS_DIR_ENV} to it), or pass --clip local-dir:/path/to/model_folder."
    )


def _resolve_clip_source(model_id: str, models_dir: Path) -> tuple[str, Path | str]:
    """Return ("local", folder) or ("hub", repo) for a model id."""
    if not isinstance(model_id, (str, Path)) or not str(model_id).strip():
        raise InvalidInputError(
            f"Invalid CLIP model id {model_id!r}: pass 'hf-hub:<repo>', 'local-dir:<folder>' or a folder path."
        )
    model_id = str(model_id).strip()
    if model_id == TINY_CLIP_ID:
        return "local", _ensure_tiny_clip(models_dir)
    if model_id.startswith("local-dir:"):
        return "local", Path(model_id[len("local-dir:"):]).expanduser().resolve()
    repo = _hub_repo(model_id)
    if repo is not None:
        if not repo:
            raise InvalidInputError(f"Invalid CLIP model id {model_id!r}: the hub repository name is empty.")
        prepared = models_dir / _clip_folder_name(repo)
        if (prepared / "open_clip_config.json").is_file():
            logger.info("Using the prepared copy of %s in %s", model_id, prepared)
            return "local", prepared.resolve()
        return "hub", repo
    return "local", Path(model_id).expanduser().resolve()


def _ensure_tiny_clip(models_dir: Path) -> Path:
    """Return the tiny CLIP folder in the models folder, building it (seed 0) on first use."""
    folder = (models_dir / TINY_CLIP_FOLDER_NAME).resolve()
    if not (folder / "open_clip_config.json").is_file():
        from MedCLIPSAMLib.tiny import build_tiny_biomedclip

        logger.warning("Building the tiny random-weight CLIP test model in %s; its saliency means nothing.", folder)
        build_tiny_biomedclip(folder, seed=0)
    return folder


def _ensure_tiny_sam(models_dir: Path) -> Path:
    """Return the tiny SAM checkpoint in the models folder, building it (seed 0) on first use."""
    path = (models_dir / SAM_FOLDER_NAME / TINY_SAM_FILE_NAME).resolve()
    if not path.is_file():
        from MedCLIPSAMLib.tiny import build_tiny_sam

        logger.warning("Building the tiny random-weight SAM test model at %s; its masks mean nothing.", path)
        build_tiny_sam(path, seed=0)
    return path


def _find_clip_weights(folder: Path) -> Path | None:
    for name in _CLIP_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors", "*.bin", "*.pth"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and "\\" not in value


def _resolve_text_encoder(folder: Path, name: str, models_dir: Path) -> str:
    """Return the text encoder source (folder path or hub id) for a ``hf_model_name`` in a local model folder.

    A relative path is taken relative to ``folder``. A hub id or a stale absolute path is replaced by the copy
    inside the folder when the folder has one (``text_encoder/config.json`` or a BERT ``config.json`` at its top).
    """
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if (candidate / "config.json").is_file():
            return str(candidate)
    elif (folder / candidate / "config.json").is_file():
        return str((folder / candidate).resolve())

    for local in (folder / TEXT_ENCODER_FOLDER_NAME, folder):
        if (local / "config.json").is_file():
            logger.info("Text encoder %r resolved to the copy in %s", name, local)
            return str(local.resolve())
    if _looks_like_hub_id(name) and not candidate.is_absolute():
        return name
    raise WeightsError(
        f"The text encoder config of the CLIP model in {folder} was not found: open_clip_config.json names "
        f"{name!r}, and neither that path nor {folder / TEXT_ENCODER_FOLDER_NAME / 'config.json'} nor "
        f"{folder / 'config.json'} exists. Copy the text encoder's config.json into {folder} or rebuild the folder. "
        + _download_hint(models_dir)
    )


def _check_local_clip_folder(folder: Path, models_dir: Path) -> dict[str, Any]:
    """Validate a local open_clip folder and return its parsed open_clip_config.json."""
    if not folder.is_dir():
        raise WeightsError(f"CLIP model folder not found: {folder}. " + _download_hint(models_dir))
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise WeightsError(
            f"The CLIP model folder {folder} has no open_clip_config.json, so it is not an open_clip model folder. "
            + _download_hint(models_dir)
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"Cannot read {config_path}: {error}. " + _download_hint(models_dir)) from error
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise WeightsError(f"{config_path} has no 'model_cfg' section. " + _download_hint(models_dir))
    if _find_clip_weights(folder) is None:
        raise WeightsError(
            f"No CLIP weights file in {folder}: expected one of {', '.join(_CLIP_WEIGHT_NAMES)}. "
            + _download_hint(models_dir)
        )
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        raise WeightsError(
            f"No tokenizer files in {folder}: expected tokenizer.json or vocab.txt next to open_clip_config.json. "
            + _download_hint(models_dir)
        )
    return config


def _create_local_clip(folder: Path, config: dict[str, Any], models_dir: Path):
    import open_clip

    text_cfg = dict(config["model_cfg"].get("text_cfg", {}))
    overrides: dict[str, Any] = {}
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_name"] = _resolve_text_encoder(folder, str(text_cfg["hf_model_name"]), models_dir)
        # open_clip reads the tokenizer of a local-dir model from the folder itself; the name only needs to be set.
        text_cfg["hf_tokenizer_name"] = str(folder)
        # A text_cfg keyword replaces the whole config section in open_clip 3.3's create_model, so it must also
        # carry the flag that stops the text tower from downloading its own pre-trained weights.
        text_cfg["hf_model_pretrained"] = False
        overrides["text_cfg"] = text_cfg
    identifier = f"local-dir:{folder}"
    model = open_clip.create_model(
        identifier, device="cpu", pretrained_hf=False, require_pretrained=True, **overrides
    )
    tokenizer = open_clip.get_tokenizer(identifier)
    return model, tokenizer


def _create_hub_clip(repo: str):
    import open_clip

    identifier = f"hf-hub:{repo}"
    model = open_clip.create_model(identifier, device="cpu", pretrained_hf=False, require_pretrained=True)
    tokenizer = open_clip.get_tokenizer(identifier)
    return model, tokenizer


def _weights_load_errors() -> tuple[type[BaseException], ...]:
    """Exception types that open_clip, transformers, safetensors and torch raise for bad or missing files."""
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors ships with open_clip's dependencies
        pass
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def load_clip(
    model_id: str = DEFAULT_CLIP_ID,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    models_dir: str | Path | None = None,
) -> ClipBundle:
    """Load a CLIP model through open_clip, once per (source, device, dtype) in this process.

    Args:
        model_id: ``hf-hub:<repo>`` (a prepared copy in ``models_dir`` is used first, so a folder written by
            `download_models` works offline), ``local-dir:<folder>`` or a plain folder path.
        device: see `resolve_device`.
        dtype: float32, float16 or bfloat16; the parameters are converted to it.
        models_dir: models folder; default `default_models_dir`.

    Returns:
        A `ClipBundle` whose model is in eval mode with gradients off on its parameters.

    Raises:
        InvalidInputError: invalid id, device or dtype.
        WeightsError: missing, partial or corrupt files, or a hub model that is neither cached nor reachable.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise InvalidInputError(
            f"Unsupported CLIP dtype {dtype!r}: use torch.float32, torch.float16 or torch.bfloat16."
        )
    torch_device = resolve_device(device)
    folder_root = _models_dir(models_dir)
    kind, source = _resolve_clip_source(model_id, folder_root)
    canonical = f"local-dir:{source}" if kind == "local" else f"hf-hub:{source}"
    key = (canonical, str(torch_device), dtype)

    with _cache_lock:
        cached = _clip_cache.get(key)
        if cached is not None:
            return cached

        if kind == "local":
            folder = Path(source)
            config = _check_local_clip_folder(folder, folder_root)
            weights = _find_clip_weights(folder)
            try:
                model, tokenizer = _create_local_clip(folder, config, folder_root)
            except WeightsError:
                raise
            except _weights_load_errors() as error:
                raise WeightsError(
                    f"The CLIP model in {folder} could not be loaded: the weights file {weights} is corrupt, "
                    f"partial or for another architecture, or a config/tokenizer file is invalid ({error}). "
                    + _download_hint(folder_root)
                ) from error
        else:
            prepared = folder_root / _clip_folder_name(str(source))
            try:
                model, tokenizer = _create_hub_clip(str(source))
            except _weights_load_errors() as error:
                from huggingface_hub import constants

                offline_variable = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
                if constants.HF_HUB_OFFLINE or offline_variable in {"1", "ON", "YES", "TRUE"}:
                    hub_state = "offline mode is on (HF_HUB_OFFLINE), so the hub was not contacted"
                else:
                    hub_state = "the hub could not be reached or refused it"
                raise WeightsError(
                    f"The CLIP model {canonical} could not be loaded: it is not in the Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}), {hub_state}, and no prepared copy exists at {prepared} "
                    f"({error}). " + _download_hint(folder_root)
                ) from error

        model = model.to(device=torch_device, dtype=dtype)
        # open_clip 3.3 returned local-dir models in training mode, which made BERT's dropout randomise every
        # text embedding; eval mode is required for repeatable results.
        model.eval()
        model.requires_grad_(False)

        import open_clip

        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess.get("size", getattr(model.visual, "image_size", 224))
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        bundle = ClipBundle(
            model=model,
            tokenizer=tokenizer,
            mean=tuple(float(value) for value in preprocess["mean"]),
            std=tuple(float(value) for value in preprocess["std"]),
            image_size=image_size,
            model_id=canonical,
            device=torch_device,
            dtype=dtype,
        )
        _clip_cache[key] = bundle
        logger.info("Loaded CLIP %s on %s (%s)", canonical, torch_device, dtype)
        return bundle


# --------------------------------------------------------------------------------------------------------------
# SAM


def _sam_fix_hint(model_type: str, models_dir: Path) -> str:
    if model_type == "medsam":
        return (
            f"Download medsam_vit_b.pth from {MEDSAM_SOURCE} and place it at "
            f"{models_dir / SAM_FOLDER_NAME / SAM_CHECKPOINTS['medsam'].filename}, or pass --sam-checkpoint PATH."
        )
    if model_type in SAM_CHECKPOINTS:
        info = SAM_CHECKPOINTS[model_type]
        return (
            f"Run `medclipsam models download --sam-type {model_type} --models-dir {models_dir}` (on a machine with "
            f"internet access, then copy the folder), or download {SAM_BASE_URL}/{info.filename} and place it at "
            f"{models_dir / SAM_FOLDER_NAME / info.filename}, or pass --sam-checkpoint PATH."
        )
    return "Pass the checkpoint path (--sam-checkpoint PATH); tiny checkpoints are written by MedCLIPSAMLib.tiny."


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """Return the plain state dict inside a checkpoint ({"model": ...} / {"state_dict": ...} / "module." keys)."""
    state = loaded
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict", "model_state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(value, torch.Tensor) for value in inner.values()):
                state = inner
                break
    if not isinstance(state, dict) or not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsError(
            f"{path} does not contain a SAM state dict (found {type(loaded).__name__}). "
            "Pass a segment-anything checkpoint (a dict of tensors, optionally under 'model')."
        )
    if all(str(name).startswith("module.") for name in state):
        state = {str(name)[len("module."):]: value for name, value in state.items()}
    return state


def _guess_sam_type(state: dict[str, torch.Tensor]) -> str | None:
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return None
    return _SAM_ENCODER_WIDTHS.get(int(weight.shape[0]))


def _build_sam_architecture(model_type: str) -> torch.nn.Module:
    if model_type == "tiny":
        from .tiny import build_tiny_sam_model

        return build_tiny_sam_model()
    from segment_anything import sam_model_registry

    return sam_model_registry[SAM_CHECKPOINTS[model_type].architecture](checkpoint=None)


def _load_sam_weights(model: torch.nn.Module, model_type: str, path: Path, models_dir: Path) -> None:
    try:
        # segment-anything's own builder calls torch.load without map_location, which fails for CUDA-saved files
        # on CPU-only machines; loading here on CPU avoids that.
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
        # torch.load raises KeyError for some files that are not zip or pickle archives at all.
        raise WeightsError(
            f"The SAM checkpoint {path} could not be read: it is truncated, corrupt or not a PyTorch file ({error}). "
            "Delete it and download it again. " + _sam_fix_hint(model_type, models_dir)
        ) from error
    state = _unwrap_state_dict(loaded, path)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        name for name in set(expected) & set(state) if tuple(expected[name].shape) != tuple(state[name].shape)
    )
    if missing or unexpected or mismatched:
        guess = _guess_sam_type(state)
        seems = f" The file seems to be a checkpoint of SAM type {guess}: pass that --sam-type." if guess else ""
        raise WeightsError(
            f"The SAM checkpoint {path} does not match the {model_type} architecture ({len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(mismatched)} differently shaped tensors, for example "
            f"{(missing + unexpected + mismatched)[:3]}).{seems}"
        )
    model.load_state_dict(state, strict=True)


def load_sam(
    model_type: str = "vit_b",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    models_dir: str | Path | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
):
    """Load a segment-anything model, once per (type, checkpoint file, device) in this process.

    Args:
        model_type: one of `SAM_TYPES`; ``medsam`` uses the ``vit_b`` architecture, ``tiny`` the test architecture.
        checkpoint: checkpoint file; default ``<models_dir>/sam/<official file name>``.
        device: see `resolve_device`.
        models_dir: models folder; default `default_models_dir`.
        download: download a missing official checkpoint (vit_b, vit_l, vit_h) into the models folder.
        progress: ``progress(done_bytes, total_bytes, message)`` during a download.

    Returns:
        ``segment_anything.modeling.Sam`` in eval mode with gradients off, on ``device``.

    Raises:
        InvalidInputError: unknown model type or device.
        WeightsError: missing, truncated, corrupt or mismatched checkpoint, or a failed download.
    """
    if model_type not in SAM_TYPES:
        raise InvalidInputError(f"Unknown SAM type {model_type!r}: use one of {', '.join(SAM_TYPES)}.")
    torch_device = resolve_device(device)
    folder_root = _models_dir(models_dir)

    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise WeightsError(f"SAM checkpoint file not found: {path}. " + _sam_fix_hint(model_type, folder_root))
    elif model_type == "tiny":
        path = _ensure_tiny_sam(folder_root)
    else:
        path = sam_checkpoint_path(model_type, folder_root)
        if not path.is_file():
            if download and SAM_CHECKPOINTS[model_type].downloadable:
                download_sam_checkpoint(model_type, folder_root, progress=progress)
            else:
                reason = "automatic download is off" if SAM_CHECKPOINTS[model_type].downloadable else (
                    "MedSAM has no stable public download URL"
                )
                raise WeightsError(
                    f"SAM {model_type} checkpoint not found at {path} ({reason}). "
                    + _sam_fix_hint(model_type, folder_root)
                )

    stat = path.stat()
    key = (model_type, str(path), stat.st_size, stat.st_mtime_ns, str(torch_device))
    with _cache_lock:
        cached = _sam_cache.get(key)
        if cached is not None:
            return cached
        model = _build_sam_architecture(model_type)
        _load_sam_weights(model, model_type, path, folder_root)
        model = model.to(torch_device).eval()
        model.requires_grad_(False)
        _sam_cache[key] = model
        logger.info("Loaded SAM %s from %s on %s", model_type, path, torch_device)
        return model


def download_sam_checkpoint(
    model_type: str = "vit_b",
    models_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    expected_sha256: str | None = None,
    base_url: str | None = None,
    timeout_s: float = _DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download an official SAM checkpoint into ``<models_dir>/sam/`` and verify its SHA-256.

    The file is streamed to ``<name>.part``, hashed on the way and renamed into place only when the hash matches,
    so an interrupted or wrong download never leaves a file that `load_sam` would pick up.

    Args:
        model_type: vit_b, vit_l or vit_h.
        expected_sha256: hex digest to check against; default the published digest of the official file.
        base_url: folder URL; default ``$MEDCLIPSAM_SAM_BASE_URL``, else Meta's download server.
        timeout_s: socket timeout in seconds for the connection and each read.

    Returns:
        The path of the verified checkpoint.

    Raises:
        InvalidInputError: a type without a download (medsam, tiny) or an unknown type.
        WeightsError: network failure or checksum mismatch; the partial file is deleted.
    """
    info = SAM_CHECKPOINTS.get(model_type)
    if info is None or not info.downloadable:
        raise InvalidInputError(
            f"SAM type {model_type!r} cannot be downloaded: use vit_b, vit_l or vit_h. "
            + (_sam_fix_hint(model_type, _models_dir(models_dir)) if model_type == "medsam" else "")
        )
    target = sam_checkpoint_path(model_type, models_dir)
    root = (base_url or os.environ.get(SAM_BASE_URL_ENV, "").strip() or SAM_BASE_URL).rstrip("/")
    url = f"{root}/{info.filename}"
    expected = (expected_sha256 or info.sha256 or "").lower() or None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    message = f"Downloading SAM {model_type} ({info.filename})"
    logger.info("%s from %s to %s", message, url, target)

    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as output:
            total = int(response.headers.get("Content-Length") or 0)
            if progress is not None:
                progress(0, total, message)
            for chunk in iter(lambda: response.read(_HASH_CHUNK_BYTES), b""):
                output.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total, message)
        if total and done != total:
            raise WeightsError(f"Download of {url} stopped after {done} of {total} bytes. Try again.")
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"Download of {url} failed ({error}). Check the network connection, or download the file on another "
            f"machine and place it at {target}, or pass --sam-checkpoint PATH."
        ) from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

    actual = digest.hexdigest()
    if expected is None:
        logger.warning("No published SHA-256 for %s: the checksum check of %s is skipped.", info.filename, target)
    elif actual != expected:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"Checksum mismatch for {url}: SHA-256 {actual}, expected {expected}. The download was deleted; try "
            f"again, or download the file elsewhere and place it at {target}."
        )
    os.replace(partial, target)
    return target


# --------------------------------------------------------------------------------------------------------------
# Preparing an offline models folder


def _fetch_hub_file(repo: str, filename: str, folder: Path, required: bool) -> Path | None:
    """Download one file of a hub repository into ``folder`` and return its path (None if optional and absent)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    target = folder / filename
    try:
        fetched = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=str(folder)))
    except LocalEntryNotFoundError as error:
        raise WeightsError(
            f"Cannot download {filename} of {repo}: the hub is not reachable (offline mode or no network) and the "
            f"file is not cached ({error}). Run this command on a machine with internet access."
        ) from error
    except EntryNotFoundError:
        if required:
            raise WeightsError(f"The hub repository {repo} has no file {filename}.") from None
        return None
    except OSError as error:
        raise WeightsError(
            f"Download of {filename} from the hub repository {repo} failed ({error}). Check the network connection "
            "and, for gated repositories, HF_TOKEN."
        ) from error
    if fetched.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetched, target)
    return target


def _download_clip_folder(clip_id: str, models_dir: Path, progress: ProgressCallback | None) -> Path:
    repo = _hub_repo(clip_id)
    if not repo:
        raise InvalidInputError(f"Only hub models can be downloaded; {clip_id!r} is not an 'hf-hub:<repo>' id.")
    final = models_dir / _clip_folder_name(repo)
    staging = final.with_name(final.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    steps = 3 + len(_TOKENIZER_FILES)
    step = 0

    def report(text: str) -> None:
        if progress is not None:
            progress(step, steps, text)

    try:
        report(f"{repo}: open_clip_config.json")
        config_path = _fetch_hub_file(repo, "open_clip_config.json", staging, required=True)
        step += 1
        config = json.loads(config_path.read_text(encoding="utf-8"))
        text_cfg = config.get("model_cfg", {}).get("text_cfg", {})

        report(f"{repo}: weights")
        weights = None
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            weights = _fetch_hub_file(repo, name, staging, required=False)
            if weights is not None:
                break
        if weights is None:
            raise WeightsError(
                f"The hub repository {repo} has neither open_clip_model.safetensors nor open_clip_pytorch_model.bin."
            )
        step += 1

        sources = {"open_clip_config.json": f"{repo}/open_clip_config.json", weights.name: f"{repo}/{weights.name}"}
        for name in _TOKENIZER_FILES:
            report(f"{repo}: {name}")
            if _fetch_hub_file(repo, name, staging, required=False) is not None:
                sources[name] = f"{repo}/{name}"
            step += 1
        if not ((staging / "tokenizer.json").is_file() or (staging / "vocab.txt").is_file()):
            raise WeightsError(f"The hub repository {repo} has no tokenizer.json or vocab.txt.")

        text_repo = text_cfg.get("hf_model_name")
        if text_repo:
            report(f"{text_repo}: config.json")
            # Only the text encoder's config is needed: the CLIP weights contain the text tower's weights.
            _fetch_hub_file(str(text_repo), "config.json", staging / TEXT_ENCODER_FOLDER_NAME, required=True)
            sources[f"{TEXT_ENCODER_FOLDER_NAME}/config.json"] = f"{text_repo}/config.json"
            text_cfg["hf_model_name"] = TEXT_ENCODER_FOLDER_NAME
            text_cfg["hf_tokenizer_name"] = "."
            config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        step += 1
        report(f"{repo}: done")

        # hf_hub_download keeps its download metadata in <local_dir>/.cache; the portable folder does not need it.
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        files = []
        for relative, source in sorted(sources.items()):
            path = staging / relative
            files.append(
                {"name": relative, "size": path.stat().st_size, "sha256": _sha256_of_file(path), "source": source}
            )
        manifest = {
            "model_id": clip_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def download_models(
    models_dir: str | Path | None = None,
    clip_id: str | None = DEFAULT_CLIP_ID,
    sam_types: Sequence[str] = ("vit_b",),
    progress: ProgressCallback | None = None,
) -> dict[str, Path]:
    """Prepare a self-contained models folder that later loads with no network.

    BiomedCLIP goes to ``<models_dir>/biomedclip/``: open_clip_config.json (text encoder names rewritten to paths
    inside the folder), the CLIP weights, the tokenizer files, ``text_encoder/config.json`` and a manifest of
    names, sizes, SHA-256 digests and sources. SAM checkpoints go to ``<models_dir>/sam/``.

    Args:
        clip_id: hub id of the CLIP model, or None to skip CLIP.
        sam_types: official SAM types to download (vit_b, vit_l, vit_h).
        progress: ``progress(done, total, message)``; files for CLIP, bytes for SAM.

    Returns:
        Mapping from "clip" and each SAM type to the prepared path.
    """
    root = _models_dir(models_dir)
    for model_type in sam_types:
        info = SAM_CHECKPOINTS.get(model_type)
        if info is None or not info.downloadable:
            raise InvalidInputError(f"SAM type {model_type!r} cannot be downloaded: use vit_b, vit_l or vit_h.")
    root.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, Path] = {}
    if clip_id:
        prepared["clip"] = _download_clip_folder(clip_id, root, progress)
    for model_type in sam_types:
        path = sam_checkpoint_path(model_type, root)
        if path.is_file() and _sha256_of_file(path) == SAM_CHECKPOINTS[model_type].sha256:
            logger.info("SAM %s is already present and verified at %s", model_type, path)
        else:
            path = download_sam_checkpoint(model_type, root, progress=progress)
        prepared[model_type] = path
    return prepared


# --------------------------------------------------------------------------------------------------------------
# Listing


def _clip_entry(name: str, folder: Path, verify: bool) -> dict[str, Any]:
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    present = (folder / "open_clip_config.json").is_file() and _find_clip_weights(folder) is not None
    entry: dict[str, Any] = {
        "name": name,
        "kind": "clip",
        "path": folder,
        "present": present,
        "size": sum(path.stat().st_size for path in files) if files else None,
        "sha256_expected": None,
        "sha256_actual": None,
        "checksum_ok": None,
        "detail": "",
    }
    manifest_path = folder / MANIFEST_NAME

    if not present:
        entry["detail"] = "missing"
        return entry
    if not manifest_path.is_file():
        entry["detail"] = "no manifest: not checked"
        return entry
    if not verify:
        entry["detail"] = "not checked"
        return entry
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        entry["checksum_ok"] = False
        entry["detail"] = f"unreadable manifest ({error})"
        return entry

    problems = []
    for item in listed:
        path = folder / item["name"]
        if not path.is_file():
            problems.append(f"{item['name']} missing")
        elif path.stat().st_size != item.get("size") or _sha256_of_file(path) != item.get("sha256"):
            problems.append(f"{item['name']} differs")
    entry["checksum_ok"] = not problems
    entry["detail"] = "; ".join(problems) if problems else f"{len(listed)} files verified"
    return entry


def _sam_entry(name: str, path: Path, expected: str | None, verify: bool) -> dict[str, Any]:
    present = path.is_file()
    actual = _sha256_of_file(path) if present and verify else None
    if actual is None or expected is None:
        checksum_ok = None
    else:
        checksum_ok = actual == expected
    if not present:
        detail = "missing"
    elif checksum_ok is None:
        detail = "no published checksum" if expected is None else "not checked"
    else:
        detail = "checksum ok" if checksum_ok else "checksum mismatch"
    return {
        "name": name,
        "kind": "sam",
        "path": path,
        "present": present,
        "size": path.stat().st_size if present else None,
        "sha256_expected": expected,
        "sha256_actual": actual,
        "checksum_ok": checksum_ok,
        "detail": detail,
    }


def list_models(models_dir: str | Path | None = None, verify: bool = True) -> list[dict[str, Any]]:
    """List the models of a models folder and their checksum state.

    Each entry has: name, kind ("clip" or "sam"), path, present, size (bytes or None), sha256_expected,
    sha256_actual, checksum_ok (None when nothing to compare or ``verify`` is False) and detail (a short text).
    A CLIP folder is checked against its manifest file by file. Hashing reads every file, a few seconds per GB.
    """
    root = _models_dir(models_dir)
    entries = [_clip_entry(CLIP_FOLDER_NAME, root / CLIP_FOLDER_NAME, verify)]
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name in (CLIP_FOLDER_NAME, SAM_FOLDER_NAME) or folder.name.endswith(".partial"):
                continue
            if (folder / "open_clip_config.json").is_file():
                entries.append(_clip_entry(folder.name, folder, verify))

    known = set()
    for model_type, info in SAM_CHECKPOINTS.items():
        path = root / SAM_FOLDER_NAME / info.filename
        known.add(path.name)
        entries.append(_sam_entry(model_type, path, info.sha256, verify))
    sam_folder = root / SAM_FOLDER_NAME
    if sam_folder.is_dir():
        for path in sorted(sam_folder.glob("*.pth")):
            if path.name not in known:
                entries.append(_sam_entry(path.stem, path, None, verify))
    return entries


def copy_clip_bundle(bundle: ClipBundle) -> ClipBundle:
    """Return an independent copy of a cached bundle (for training or other changes to the model)."""
    return ClipBundle(**{**bundle.__dict__, "model": copy.deepcopy(bundle.model)})

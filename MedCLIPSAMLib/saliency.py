"""Saliency maps of a CLIP prompt score: gScoreCAM (default) and GradCAM, plus prompt embeddings.

Both methods explain the CLIP logit of one prompt, ``logit_scale.exp() * cos(image_embedding, text_embedding)``
(no softmax over prompts), at the output of the LayerNorm in front of the MLP (``norm2``) of the last block of the
timm ViT image tower. The patch tokens of that layer (the class token dropped), reshaped row-major to
``[C, h, w]`` (``h = w = 14`` for a 224-pixel ViT-B/16), are the activation maps.

gScoreCAM (Chen et al., ACCV 2022) ranks channels by the spatial mean of the signed gradient and keeps the top k.
Each kept channel is scored by the prompt logit of the input masked with that channel's normalised activation map.
The channel weights are a softmax over a C-vector holding those scores (0 for the other channels). GradCAM weights
channels by the spatial mean of the gradient. Both return ``[S, S]`` float32 maps in [0, 1] on the CLIP input grid,
and `MedCLIPSAMLib.imaging.Letterbox.map_to_original` maps them back onto the image.

``compute_dtype=torch.bfloat16`` (or float16) runs the image tower of a float32 model under `torch.autocast`: matrix
products in that type, normalisations, softmax and the residual stream in float32 (PyTorch's autocast op lists).
On CPUs with bfloat16 instructions this is about as fast as a model converted to bfloat16 with `load_clip(...,
dtype=torch.bfloat16)`, and closer to float32 because only the products are rounded.

The functions need only these attributes of the CLIP bundle (`MedCLIPSAMLib.models.ClipBundle`): ``model`` (open_clip
CLIP with ``encode_image``, ``encode_text``, ``logit_scale`` and ``visual.trunk``), ``tokenizer``, ``model_id``,
``device`` and ``dtype``.
"""

from __future__ import annotations

import logging
import contextlib
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.errors import CancelledError, InvalidInputError

__all__ = ["clip_score", "encode_prompt", "gradcam", "gscorecam"]

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 60
"""Channels kept by gScoreCAM (k = 60 in the MedCLIP-SAM experiments)."""

DEFAULT_BATCH_SIZE = 8
"""Masked inputs per forward pass in gScoreCAM. The result does not depend on it. On a 2-core AVX-512 CPU, 8 was the
fastest float32 setting for ViT-B/16 and within 5 % of the best bfloat16 one. Larger batches were slower there in
float32 (bench/bench_pipeline.py, results in docs/benchmarks.md)."""

MASK_NORMALISATION_EPS = 1e-6
"""Added to ``max - min`` when min-max normalising a channel's upsampled activation map (gScoreCAM)."""

SUPPORTED_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Values of the ``compute_dtype`` argument; float32 means no autocast."""

PROMPT_CACHE_SIZE = 256
"""Prompt embeddings cached per model object. Beyond this count the oldest entry is dropped."""

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]

# model object -> OrderedDict[(model id, prompt) -> embedding]. Keyed by the model object itself (weakly), so a
# model whose weights differ but whose id is the same (tests, fine-tuning) never reads another model's cache.
_PROMPT_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[tuple[str, str], torch.Tensor]]
_PROMPT_CACHE = weakref.WeakKeyDictionary()
_PROMPT_CACHE_LOCK = threading.Lock()

# Serialises model use in this module across threads. A saliency forward hook on a shared model would otherwise
# also fire for another thread's forward passes and capture the wrong activations, and the temporary eval mode of
# one call could be restored in the middle of another.
_MODEL_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------------------------------
# Prompt embeddings and scores


def _count_tokens(tokenizer: Any, prompt: str) -> int | None:
    """Count the tokens of `prompt` including special tokens, or return None when the tokenizer cannot tell."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and callable(inner):
        clean = getattr(tokenizer, "clean_fn", None)
        text = clean(prompt) if callable(clean) else prompt
        return len(inner(text, add_special_tokens=True)["input_ids"])
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        # open_clip's SimpleTokenizer adds start and end tokens around the encoded text.
        return len(encode(prompt)) + 2
    return None


def encode_prompt(clip: Any, prompt: str) -> torch.Tensor:
    """Encode a text prompt into the joint embedding space.

    Embeddings are cached per model object and ``(model_id, prompt)``. The model runs in eval mode, so dropout
    never makes embeddings random, and its training flags are restored afterwards.

    Args:
        clip: CLIP bundle (`MedCLIPSAMLib.models.ClipBundle`).
        prompt: Non-empty text; surrounding whitespace is stripped. At most the tokenizer's context length in
            tokens (256 for BiomedCLIP), counting the special tokens.

    Returns:
        ``[D]`` float32 tensor on ``clip.device``, L2-normalised (``D = 512`` for BiomedCLIP). A fresh copy: the
        caller may modify it.

    Raises:
        InvalidInputError: For a prompt that is not a string, is empty or whitespace only, or is longer than the
            context length.
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"Expected a text prompt (str), got {type(prompt).__name__}.")
    text = prompt.strip()
    if not text:
        raise InvalidInputError("The prompt is empty: type a description of the target, e.g. 'breast tumor'.")

    model = clip.model
    key = (str(clip.model_id), text)
    with _PROMPT_CACHE_LOCK:
        cached = _PROMPT_CACHE.get(model, {}).get(key)
    if cached is not None:
        return cached.clone()

    tokenizer = clip.tokenizer
    context_length = getattr(tokenizer, "context_length", None)
    token_count = _count_tokens(tokenizer, text)
    if context_length and token_count is not None and token_count > context_length:
        raise InvalidInputError(
            f"The prompt has {token_count} tokens, more than the model's context length of {context_length} "
            "tokens: shorten it."
        )

    tokens = tokenizer([text])
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise InvalidInputError(f"The tokenizer returned shape {tuple(tokens.shape)}, expected [1, context length].")
    with _MODEL_LOCK, _eval_mode(model), torch.no_grad():
        features = model.encode_text(tokens.to(clip.device))
    embedding = F.normalize(features[0].detach().float(), dim=-1)

    with _PROMPT_CACHE_LOCK:
        entries = _PROMPT_CACHE.setdefault(model, OrderedDict())
        entries[key] = embedding
        while len(entries) > PROMPT_CACHE_SIZE:
            entries.popitem(last=False)
    return embedding.clone()


def _prepare_text_embedding(clip: Any, text_embedding: torch.Tensor) -> torch.Tensor:
    """Return the text embedding as a unit-length float32 ``[D]`` tensor on the model's device."""
    if not isinstance(text_embedding, torch.Tensor):
        raise InvalidInputError(
            f"Expected the text embedding as a torch tensor, got {type(text_embedding).__name__}; "
            "use encode_prompt."
        )
    embedding = text_embedding.detach()
    if embedding.ndim == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.ndim != 1:
        raise InvalidInputError(
            f"Expected one text embedding of shape [D] or [1, D], got shape {tuple(text_embedding.shape)}."
        )
    embedding = embedding.to(device=clip.device, dtype=torch.float32)
    if not bool(torch.isfinite(embedding).all()) or float(embedding.norm()) == 0.0:
        raise InvalidInputError("The text embedding contains NaN or infinite values or is all zero.")
    return F.normalize(embedding, dim=0)


def _prepare_image(clip: Any, image_tensor: torch.Tensor) -> torch.Tensor:
    """Validate a ``[1, 3, S, S]`` CLIP input and return it on the model's device in the model's dtype."""
    if not isinstance(image_tensor, torch.Tensor):
        raise InvalidInputError(
            f"Expected the CLIP input as a torch tensor, got {type(image_tensor).__name__}; use clip_input."
        )
    shape = tuple(image_tensor.shape)
    if image_tensor.ndim != 4 or shape[0] != 1 or shape[1] != 3 or shape[2] != shape[3]:
        raise InvalidInputError(f"Expected a CLIP input tensor of shape [1, 3, S, S], got {list(shape)}.")
    expected_size = getattr(clip, "image_size", None)
    if expected_size is not None and shape[2] != int(expected_size):
        raise InvalidInputError(
            f"Expected a {expected_size}x{expected_size} CLIP input for model {clip.model_id}, got "
            f"{shape[2]}x{shape[3]}; build it with clip_input(..., size={expected_size})."
        )
    if not bool(torch.isfinite(image_tensor).all()):
        raise InvalidInputError("The CLIP input tensor contains NaN or infinite values.")
    return image_tensor.detach().to(device=clip.device, dtype=clip.dtype)


def _check_compute_dtype(compute_dtype: torch.dtype | None) -> None:
    if compute_dtype is not None and compute_dtype not in SUPPORTED_COMPUTE_DTYPES:
        raise InvalidInputError(
            f"Unsupported compute_dtype {compute_dtype!r}: use None, torch.float32, torch.bfloat16 or torch.float16."
        )


def _precision(clip: Any, compute_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Return the autocast context that makes the image tower compute in `compute_dtype`, or a no-op context.

    Autocast applies only to a float32 model and a reduced `compute_dtype`. A model converted to bfloat16 or float16
    always computes in its own type.
    """
    _check_compute_dtype(compute_dtype)
    if compute_dtype is None or compute_dtype == torch.float32 or clip.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(clip.device).type, dtype=compute_dtype)


def _prompt_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embedding: torch.Tensor,
    precision: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Return ``logit_scale.exp() * cos(image_embedding, text_embedding)`` per image as a float32 ``[B]`` tensor.

    `precision` is a context (autocast or none) entered around the image tower only.
    """
    with precision if precision is not None else contextlib.nullcontext():
        features = model.encode_image(images)
    image_embeddings = F.normalize(features.float(), dim=-1)
    scale = model.logit_scale.float().exp()
    return scale * (image_embeddings @ text_embedding)


def clip_score(
    clip: Any, image_tensor: torch.Tensor, text_embedding: torch.Tensor, *, compute_dtype: torch.dtype | None = None
) -> float:
    """Compute the CLIP logit of one prompt for one image: ``logit_scale.exp() * cos(image, text)``.

    Args:
        clip: CLIP bundle.
        image_tensor: ``[1, 3, S, S]`` normalised CLIP input (`MedCLIPSAMLib.imaging.clip_input`).
        text_embedding: ``[D]`` prompt embedding (`encode_prompt`).
        compute_dtype: None or float32 for the model's own type; bfloat16 or float16 to run a float32 image tower
            under autocast (see the module notes).

    Returns:
        The logit as a Python float (BiomedCLIP's logit scale is about 100, so the range is about -100 to 100).
    """
    precision = _precision(clip, compute_dtype)
    image = _prepare_image(clip, image_tensor)
    text = _prepare_text_embedding(clip, text_embedding)
    with _MODEL_LOCK, _eval_mode(clip.model), torch.inference_mode():
        return float(_prompt_logits(clip.model, image, text, precision)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Shared CAM machinery


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode for the block and restore every submodule's training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _target_layer(clip: Any) -> torch.nn.Module:
    """Return the ``norm2`` LayerNorm of the last block of the timm ViT image tower."""
    trunk = getattr(getattr(clip.model, "visual", None), "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1], "norm2"):
        raise InvalidInputError(
            f"Model {clip.model_id} has no timm ViT image tower (visual.trunk.blocks[-1].norm2): "
            "saliency needs a BiomedCLIP-style ViT model."
        )
    return blocks[-1].norm2


def _activation_maps(tokens: torch.Tensor, clip: Any) -> torch.Tensor:
    """Turn ``[1, N, C]`` ViT tokens into ``[C, h, w]`` float32 patch maps (prefix tokens dropped, row-major)."""
    trunk = clip.model.visual.trunk
    prefix = int(getattr(trunk, "num_prefix_tokens", 1))
    patches = tokens[0, prefix:, :].float()
    count = patches.shape[0]
    grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == count:
        height, width = int(grid[0]), int(grid[1])
    else:
        height = width = int(round(count**0.5))
        if height * width != count:
            raise InvalidInputError(f"Cannot arrange {count} patch tokens of model {clip.model_id} on a square grid.")
    return patches.transpose(0, 1).reshape(patches.shape[1], height, width)


def _activations_and_gradients(
    clip: Any, image: torch.Tensor, text: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run one forward and backward pass of the prompt logit.

    Returns:
        ``(activations, gradients, logit)``: ``[C, h, w]`` float32 activations of the target layer, the gradient of
        the logit with respect to them (same shape), and the logit.
    """
    model = clip.model
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        # Cut the graph here: the gradient is needed only with respect to this output, so the caller's
        # requires_grad flags on the parameters do not matter and stay untouched.
        leaf = output.detach().requires_grad_(True)
        captured["tokens"] = leaf
        return leaf

    handle = _target_layer(clip).register_forward_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Cloned here so that an input made under the caller's inference mode becomes a normal tensor.
            logit = _prompt_logits(model, image.clone(), text.clone(), _precision(clip, compute_dtype))[0]
            if "tokens" not in captured:
                raise InvalidInputError(f"The target layer of model {clip.model_id} did not run in encode_image.")
            (gradient,) = torch.autograd.grad(logit, captured["tokens"], allow_unused=True)
    finally:
        handle.remove()

    tokens = captured["tokens"].detach()
    if gradient is None:
        gradient = torch.zeros_like(tokens)
    activations = _activation_maps(tokens, clip)
    gradients = _activation_maps(gradient.detach(), clip)
    return activations, gradients, float(logit.detach())


def _weighted_map(weights: torch.Tensor, activations: torch.Tensor, size: int) -> np.ndarray:
    """Compute ``ReLU(sum_c weights[c] * activations[c])``, min-max normalise it and resize to ``size x size``.

    A constant map, all zeros included, carries no spatial information and becomes all zeros.
    """
    cam = torch.relu(torch.einsum("c,chw->hw", weights.float(), activations.float()))
    low, high = cam.min(), cam.max()
    if float(high - low) > 0.0 and bool(torch.isfinite(high - low)):
        cam = (cam - low) / (high - low)
    else:
        cam = torch.zeros_like(cam)
    resized = F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Public CAM methods


def gscorecam(
    clip: Any,
    image_tensor: torch.Tensor,
    text_embedding: torch.Tensor,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    compute_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Compute the gScoreCAM saliency map of one prompt on the CLIP input grid.

    Args:
        clip: CLIP bundle.
        image_tensor: ``[1, 3, S, S]`` normalised CLIP input (``S = clip.image_size``, 224).
        text_embedding: ``[D]`` prompt embedding (`encode_prompt`).
        top_k: Channels kept by gradient rank (>= 1). A value above the channel count C is clamped to C with a
            warning.
        batch_size: Masked inputs per forward pass (>= 1). It changes speed and memory, not the result.
        progress: Optional ``progress(done, total, message)`` called after each batch of masked forwards.
        cancel: Optional callback polled before each batch; when it returns True, `CancelledError` is raised.
        compute_dtype: None or float32 for the model's own type; bfloat16 or float16 to run a float32 image tower
            under autocast (see the module notes).

    Returns:
        ``[S, S]`` float32 map in [0, 1] (rows, columns of the CLIP input). All zeros when the weighted sum is
        constant (nothing to localise).

    The model is put in eval mode for the call and its training flags are restored afterwards. No hook survives
    the call.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"Invalid top_k={top_k!r}: use a positive number of channels (default 60).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInputError(f"Invalid batch_size={batch_size!r}: use a positive number of images per batch.")
    _check_compute_dtype(compute_dtype)
    image = _prepare_image(clip, image_tensor)
    text = _prepare_text_embedding(clip, text_embedding)
    size = image.shape[-1]
    model = clip.model

    with _MODEL_LOCK, _eval_mode(model):
        activations, gradients, _ = _activations_and_gradients(clip, image, text, compute_dtype)
        channels = activations.shape[0]
        if top_k > channels:
            warnings.warn(
                f"top_k={top_k} exceeds the {channels} channels of model {clip.model_id}; using all {channels}.",
                UserWarning,
                stacklevel=2,
            )
            top_k = channels
        importance = gradients.mean(dim=(1, 2))
        kept_channels = torch.argsort(importance, descending=True, stable=True)[: int(top_k)]

        # One [1, S, S] mask per kept channel: upsample (align corners), then min-max normalise to [0, 1].
        masks = F.interpolate(
            activations[kept_channels][:, None], size=(size, size), mode="bilinear", align_corners=True
        )
        low = masks.amin(dim=(2, 3), keepdim=True)
        high = masks.amax(dim=(2, 3), keepdim=True)
        masks = (masks - low) / (high - low + MASK_NORMALISATION_EPS)

        scores = torch.empty(int(top_k), dtype=torch.float32, device=activations.device)
        total = int(top_k)
        # The masked forwards need only the final embeddings: no gradient, and the activation hook is already gone.
        with torch.inference_mode():
            for start in range(0, total, int(batch_size)):
                if cancel is not None and cancel():
                    raise CancelledError("gScoreCAM was cancelled.")
                stop = min(start + int(batch_size), total)
                masked = (image.float() * masks[start:stop]).to(clip.dtype)
                scores[start:stop] = _prompt_logits(model, masked, text, _precision(clip, compute_dtype))
                if progress is not None:
                    progress(stop, total, "gScoreCAM masked forward passes")

    # NaN scores count as 0. A logit is bounded by the logit scale, so infinite values cannot occur otherwise.
    scores = torch.nan_to_num(scores, nan=0.0)
    logits = torch.zeros(channels, dtype=torch.float32, device=activations.device)
    logits[kept_channels] = scores
    weights = torch.softmax(logits, dim=0)
    return _weighted_map(weights, activations, size)


def gradcam(
    clip: Any, image_tensor: torch.Tensor, text_embedding: torch.Tensor, *, compute_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Compute the GradCAM saliency map of one prompt on the CLIP input grid (baseline for ablations).

    Same layer and score as `gscorecam`. The channel weights are the spatial means of the gradient. `compute_dtype`
    is as in `gscorecam`.

    Returns:
        ``[S, S]`` float32 map in [0, 1], all zeros when the weighted sum is constant.
    """
    _check_compute_dtype(compute_dtype)
    image = _prepare_image(clip, image_tensor)
    text = _prepare_text_embedding(clip, text_embedding)
    with _MODEL_LOCK, _eval_mode(clip.model):
        activations, gradients, _ = _activations_and_gradients(clip, image, text, compute_dtype)
    weights = gradients.mean(dim=(1, 2))
    return _weighted_map(weights, activations, image.shape[-1])

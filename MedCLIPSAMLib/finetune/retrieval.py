"""Image-text retrieval evaluation: top-k accuracy in random batches of pairs, as in the MedCLIP-SAM paper.

Protocol: all pairs are embedded once. Each run shuffles the pairs with its own seed and cuts them into
batches of 50. A remainder smaller than a batch is left out of that run, and a set of fewer than 50 pairs is one
batch. Inside a batch every image queries the batch's captions (image -> text) and every caption queries the
batch's images (text -> image); a query scores a top-k hit when one of its k most similar candidates is a
correct match. Accuracies are averaged over the queries of a run, and reported as mean and sample standard
deviation over 5 runs.

A candidate is a correct match when its caption is identical to the query pair's caption. For data with unique
captions this is the usual "the paired item" rule. When several pairs share one caption (class-level captions),
their text cannot distinguish them, so any of them counts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.finetune.data import ImageCaptionDataset, ImageCaptionPair, build_preprocess

__all__ = [
    "DEFAULT_BATCH_PAIRS",
    "DEFAULT_RUNS",
    "DEFAULT_TOP_K",
    "RetrievalResult",
    "embed_pairs",
    "evaluate_retrieval",
    "retrieval_hits",
    "retrieval_table",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_PAIRS = 50
"""Pairs per retrieval batch (MedCLIP-SAM paper)."""

DEFAULT_RUNS = 5
"""Runs with different random batches (MedCLIP-SAM paper)."""

DEFAULT_TOP_K = (1, 2)
"""Ranks at which accuracy is reported (MedCLIP-SAM paper: top-1 and top-2)."""

_DIRECTIONS = ("image_to_text", "text_to_image")


@dataclass
class RetrievalResult:
    """Retrieval accuracy of one model; accuracies are fractions in [0, 1].

    ``mean`` and ``std`` map metric names such as ``"image_to_text_top1"`` to the mean and sample standard
    deviation over runs. ``per_run`` contains each run's values. ``chance`` maps ``"top1"``, ``"top2"`` to the
    expected accuracy of a random ranking in the same batches (equal for both directions).
    """

    model_id: str
    pairs: int
    batch_pairs: int
    runs: int
    top_k: tuple[int, ...]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    per_run: list[dict[str, float]] = field(default_factory=list)
    chance: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def embed_pairs(
    clip,
    pairs: Sequence[ImageCaptionPair],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the images and captions of `pairs` with a loaded CLIP bundle (model used as is, in eval mode).

    Args:
        clip: `MedCLIPSAMLib.models.ClipBundle`.
        pairs: Image-caption pairs.

    Returns:
        ``(image_features, text_features)``: two [N, D] float32 CPU tensors, L2-normalised, in `pairs` order.
    """
    preprocess = build_preprocess(clip.image_size, clip.mean, clip.std)
    loader = DataLoader(
        ImageCaptionDataset(pairs, preprocess, clip.tokenizer),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    model = clip.model
    if model.training:
        raise InvalidInputError("embed_pairs needs a model in eval mode; call model.eval() first.")
    images_out, texts_out = [], []
    for images, tokens, _ in loader:
        images_out.append(model.encode_image(images.to(clip.device, clip.dtype), normalize=True).float().cpu())
        texts_out.append(model.encode_text(tokens.to(clip.device), normalize=True).float().cpu())
        if progress is not None:
            progress(sum(len(part) for part in images_out), len(pairs), "embedding pairs")
    return torch.cat(images_out), torch.cat(texts_out)


def _caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """Map each caption to an integer id shared by identical captions: [N] int64."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(caption, len(ids)) for caption in captions], dtype=torch.int64)


def _chance_hit_rate(positives: int, candidates: int, k: int) -> float:
    """Probability that a uniformly random ranking puts one of `positives` correct items in its top k."""
    k = min(k, candidates)
    return 1.0 - math.comb(candidates - positives, k) / math.comb(candidates, k)


def retrieval_hits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_ids: torch.Tensor | None = None,
    top_k: Sequence[int] = DEFAULT_TOP_K,
) -> dict[str, torch.Tensor]:
    """Score top-k hits of every query of one batch in both directions.

    Args:
        image_features: [B, D] L2-normalised image embeddings.
        text_features: [B, D] L2-normalised text embeddings; row i is the caption of image i.
        caption_ids: [B] int64 ids, equal for identical captions; default all different (only the pair matches).
        top_k: Ranks k >= 1 to score.

    Returns:
        Mapping ``"<direction>_top<k>"`` to a [B] bool tensor of hits per query, and ``"chance_top<k>"`` to a
        [B] float64 tensor of the random-ranking hit probability per query.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise InvalidInputError(
            f"image and text features must be [B, D] of the same shape, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}."
        )
    batch = image_features.shape[0]
    if caption_ids is None:
        caption_ids = torch.arange(batch)
    correct = caption_ids.view(-1, 1) == caption_ids.view(1, -1)
    similarity = image_features.float() @ text_features.float().T
    hits: dict[str, torch.Tensor] = {}
    positives_per_query = correct.sum(dim=1).tolist()
    for k in top_k:
        if k < 1:
            raise InvalidInputError(f"top-k ranks must be >= 1, got {k}.")
        depth = min(k, batch)
        for direction, scores in zip(_DIRECTIONS, (similarity, similarity.T)):
            ranked = scores.topk(depth, dim=1).indices
            hits[f"{direction}_top{k}"] = correct.gather(1, ranked).any(dim=1)
        hits[f"chance_top{k}"] = torch.tensor(
            [_chance_hit_rate(count, batch, k) for count in positives_per_query], dtype=torch.float64
        )
    return hits


def evaluate_retrieval(
    clip,
    pairs: Sequence[ImageCaptionPair],
    *,
    batch_pairs: int = DEFAULT_BATCH_PAIRS,
    runs: int = DEFAULT_RUNS,
    seed: int = 0,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    embed_batch_size: int = 64,
    num_workers: int = 0,
    model_label: str | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RetrievalResult:
    """Measure top-k image->text and text->image accuracy in random batches (protocol in the module docstring).

    Args:
        clip: `MedCLIPSAMLib.models.ClipBundle` of the model to evaluate.
        pairs: Image-caption pairs, at least 2.
        batch_pairs: Pairs per batch, >= 2.
        runs: Number of runs, >= 1; run r shuffles with seed ``seed + r``.
        top_k: Ranks k to report.
        model_label: Name for the tables; default ``clip.model_id``.
        features: Precomputed ``(image_features, text_features)`` [N, D] of `pairs`, to skip embedding.
    """
    if len(pairs) < 2:
        raise InvalidInputError(f"Retrieval needs at least 2 image-caption pairs, got {len(pairs)}.")
    if batch_pairs < 2:
        raise InvalidInputError(f"batch_pairs must be >= 2, got {batch_pairs}.")
    if runs < 1:
        raise InvalidInputError(f"runs must be >= 1, got {runs}.")
    if features is None:
        features = embed_pairs(clip, pairs, batch_size=embed_batch_size, num_workers=num_workers)
    image_features, text_features = features
    caption_ids = _caption_groups([pair.caption for pair in pairs])

    count = len(pairs)
    batch = min(batch_pairs, count)
    if count < batch_pairs:
        logger.warning(
            "Only %d pairs, fewer than a batch of %d: each run uses one batch of %d.", count, batch_pairs, count
        )
    batches_per_run = count // batch

    result = RetrievalResult(
        model_id=model_label or clip.model_id, pairs=count, batch_pairs=batch, runs=runs, top_k=tuple(top_k)
    )
    for run in range(runs):
        generator = torch.Generator().manual_seed(seed + run)
        order = torch.randperm(count, generator=generator)
        totals: dict[str, list[torch.Tensor]] = {}
        for start in range(0, batches_per_run * batch, batch):
            rows = order[start : start + batch]
            hits = retrieval_hits(image_features[rows], text_features[rows], caption_ids[rows], top_k)
            for name, values in hits.items():
                totals.setdefault(name, []).append(values)
        result.per_run.append({name: float(torch.cat(values).double().mean()) for name, values in totals.items()})

    for name in result.per_run[0]:
        values = np.array([run_values[name] for run_values in result.per_run])
        if name.startswith("chance_"):
            result.chance[name[len("chance_") :]] = float(values.mean())
            continue
        result.mean[name] = float(values.mean())
        result.std[name] = float(values.std(ddof=1)) if runs > 1 else 0.0
    for run_values in result.per_run:
        for name in [key for key in run_values if key.startswith("chance_")]:
            del run_values[name]
    return result


def retrieval_table(results: Sequence[RetrievalResult]) -> str:
    """Format results as a Markdown table: one row per model, accuracy in percent as mean +- std.

    A last row gives the accuracy of a random ranking in the batches of the first result.
    """
    if not results:
        raise InvalidInputError("No retrieval results to format.")
    top_k = results[0].top_k
    columns = [f"{label} top-{k}" for label in ("I->T", "T->I") for k in top_k]
    keys = [f"{direction}_top{k}" for direction in _DIRECTIONS for k in top_k]
    lines = [
        "| Model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for result in results:
        cells = [f"{100 * result.mean[key]:.1f} +- {100 * result.std[key]:.1f}" for key in keys]
        lines.append(f"| {result.model_id} | " + " | ".join(cells) + " |")
    chance = results[0].chance
    lines.append(
        "| chance (random ranking) | "
        + " | ".join(f"{100 * chance[f'top{k}']:.1f}" for _ in _DIRECTIONS for k in top_k)
        + " |"
    )
    first = results[0]
    lines.append("")
    lines.append(f"{first.pairs} pairs, batches of {first.batch_pairs}, {first.runs} runs (mean +- sample std, %).")
    return "\n".join(lines)

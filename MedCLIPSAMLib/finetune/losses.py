"""Contrastive image-text losses for fine-tuning BiomedCLIP: DHN-NCE, HN-NCE, DCL and InfoNCE.

All four losses share one form. With L2-normalised image embeddings I and text embeddings T (both [B, D]) and a
fixed temperature tau, the similarity logits are ``S = I @ T.T / tau``. S is open_clip's ``logits_per_image``, and
its transpose is ``logits_per_text``. For one direction, query i has the positive S_ii and the negatives S_ij, j != i:

    l_i = -S_ii + log( a * exp(S_ii) + sum_{j != i} W_ij * exp(S_ij) )
    W_ij = (B - 1) * exp(beta * S_ij) / sum_{k != i} exp(beta * S_ik)

The loss is ``mean_i l_i`` over the image-to-text rows (S, hardness beta1) plus ``mean_i l_i`` over the
text-to-image rows (S.T, hardness beta2):

    =========  ===============================  =========================
    loss       a (positive in the denominator)  beta1, beta2
    =========  ===============================  =========================
    dhn-nce    0                                given (default 0.15)
    hn-nce     1                                given (default 0.15)
    dcl        0                                0 (all weights are 1)
    infonce    1                                0 (all weights are 1)
    =========  ===============================  =========================

The hard-negative weights W_ij are positive, sum to B - 1 over the negatives of each row, and grow with the
similarity of the negative, so that negatives close to the query dominate the denominator. They are
differentiable functions of S (not detached), so the gradient is that of the formula above as written. A
consequence: at a large beta (1.0 in the tests) the gradient on a very easy negative can turn slightly negative,
because raising it lowers the weights of the hard ones; at beta = 0.15 every negative is pushed away. InfoNCE is
the sum of the two cross-entropies of CLIP, which is twice open_clip's ``ClipLoss`` at the same temperature.

Sources: DHN-NCE from the MedCLIP-SAM paper (Koleilat et al., MICCAI 2024, arXiv 2403.20253), HN-NCE from
Radenovic et al. (CVPR 2023, arXiv 2301.02280), DCL from Yeh et al. (ECCV 2022, arXiv 2110.06848).

Every sum is evaluated as a log-sum-exp with the weights folded into the exponent as log-weights,
``log W_ij = log(B - 1) + beta * S_ij - logsumexp_{k != i}(beta * S_ik)``, so no exponential is ever formed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_TEMPERATURE",
    "LOSS_NAMES",
    "ContrastiveLoss",
    "contrastive_loss_from_logits",
    "contrastive_row_losses",
    "dcl_loss",
    "dhn_nce_loss",
    "hn_nce_loss",
    "info_nce_loss",
    "loss_settings",
    "symmetric_row_losses",
]

DEFAULT_TEMPERATURE = 0.6
"""Fixed temperature tau of the similarity logits (MedCLIP-SAM paper setting)."""

DEFAULT_BETA = 0.15
"""Hardness beta1 = beta2 of the hard-negative weights (MedCLIP-SAM paper setting)."""

LOSS_NAMES = ("dhn-nce", "hn-nce", "dcl", "infonce")
"""Loss names that `ContrastiveLoss` and ``medclipsam finetune --loss`` accept."""

# Loss name -> (positive term in the denominator, hard-negative weights used).
_LOSS_FORMS = {
    "dhn-nce": (False, True),
    "hn-nce": (True, True),
    "dcl": (False, False),
    "infonce": (True, False),
}


def loss_settings(name: str) -> tuple[bool, bool]:
    """Return ``(include_positive, uses_beta)`` of the loss called `name` (one of `LOSS_NAMES`)."""
    key = name.strip().lower().replace("_", "-")
    if key not in _LOSS_FORMS:
        raise InvalidInputError(f"Unknown contrastive loss {name!r}; use one of {', '.join(LOSS_NAMES)}.")
    return _LOSS_FORMS[key]


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta >= 0):
        raise InvalidInputError(f"Hardness beta must be a finite number >= 0, got {beta!r}.")


def _check_temperature_and_beta(temperature: float, betas: tuple[float, ...]) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidInputError(f"Temperature must be a positive number, got {temperature!r}.")
    for beta in betas:
        _check_beta(beta)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise InvalidInputError(
            "image_features and text_features must be 2D [batch, dim] tensors, got shapes "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    if image_features.shape != text_features.shape:
        raise InvalidInputError(
            "image_features and text_features must have the same shape (one caption per image), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    if image_features.shape[0] < 2:
        raise InvalidInputError(
            f"A contrastive loss needs a batch of at least 2 image-text pairs, got {image_features.shape[0]}; "
            "use a larger batch size or drop the last incomplete batch."
        )


def contrastive_row_losses(
    logits: torch.Tensor,
    positive_index: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    include_positive: bool = False,
) -> torch.Tensor:
    """Compute the per-query loss l_n of one retrieval direction.

    Args:
        logits: [N, M] similarity logits (cosine / tau) of N queries against M >= 2 candidates, float.
        positive_index: [N] int64 column of each query's positive candidate, in [0, M).
        beta: Hardness of the negative weights, >= 0; 0 gives every negative the weight 1.
        include_positive: Add exp(S_np) to the denominator (HN-NCE, InfoNCE) instead of leaving it out
            (DHN-NCE, DCL).

    Returns:
        [N] loss per query, ``-S_np + log(a * exp(S_np) + sum_{j != p} W_nj * exp(S_nj))`` with
        ``W_nj = (M - 1) * softmax_{j != p}(beta * S_n)_j`` and a = 1 if `include_positive` else 0. Computed in
        float32 or wider, the promoted dtype of `logits`.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InvalidInputError(
            f"logits must be [queries, candidates] with >= 2 candidates, got {tuple(logits.shape)}."
        )
    if positive_index.shape != (logits.shape[0],):
        raise InvalidInputError(
            f"positive_index must have shape [{logits.shape[0]}], got {tuple(positive_index.shape)}."
        )
    _check_beta(beta)

    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_candidates = logits.shape[1]
    positive_mask = torch.zeros_like(logits, dtype=torch.bool)
    positive_mask.scatter_(1, positive_index.view(-1, 1).to(logits.device), True)
    positive_logits = logits.gather(1, positive_index.view(-1, 1).to(logits.device)).squeeze(1)

    # Exponents of the denominator: S_nj + log W_nj on the negatives, -inf on the positive.
    exponents = logits.masked_fill(positive_mask, float("-inf"))
    if beta > 0:
        scaled = (beta * logits).masked_fill(positive_mask, float("-inf"))
        log_weights = math.log(num_candidates - 1) + scaled - torch.logsumexp(scaled, dim=1, keepdim=True)
        exponents = logits + log_weights
    if include_positive:
        exponents = torch.where(positive_mask, logits, exponents)
    return torch.logsumexp(exponents, dim=1) - positive_logits


def symmetric_row_losses(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    candidate_image_features: torch.Tensor,
    candidate_text_features: torch.Tensor,
    positive_index: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    beta_image_to_text: float = DEFAULT_BETA,
    beta_text_to_image: float = DEFAULT_BETA,
    include_positive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the per-query losses of both directions for queries drawn from a larger candidate batch.

    The distributed trainer calls this with its local pairs as queries and the pairs of all ranks as candidates,
    so every query is scored against the negatives of the global batch.

    Args:
        image_features: [N, D] L2-normalised image embeddings of the queries.
        text_features: [N, D] L2-normalised text embeddings of the queries (row n pairs with image row n).
        candidate_image_features: [M, D] L2-normalised image embeddings of all pairs of the batch, M >= 2.
        candidate_text_features: [M, D] L2-normalised text embeddings of all pairs of the batch.
        positive_index: [N] int64 row of each query pair within the candidates.
        temperature: tau, the logits are cosine / tau.
        beta_image_to_text: beta1, hardness of the image-to-text negative weights.
        beta_text_to_image: beta2, hardness of the text-to-image negative weights.
        include_positive: Keep the positive in the denominator (HN-NCE, InfoNCE).

    Returns:
        ``(image_to_text, text_to_image)``: two [N] float tensors of per-query losses; the loss of the whole
        batch is ``image_to_text.sum() / M + text_to_image.sum() / M`` summed over all query chunks.
    """
    _check_temperature_and_beta(temperature, (beta_image_to_text, beta_text_to_image))
    logits_image_to_text = image_features @ candidate_text_features.T / temperature
    logits_text_to_image = text_features @ candidate_image_features.T / temperature
    image_to_text = contrastive_row_losses(
        logits_image_to_text, positive_index, beta=beta_image_to_text, include_positive=include_positive
    )
    text_to_image = contrastive_row_losses(
        logits_text_to_image, positive_index, beta=beta_text_to_image, include_positive=include_positive
    )
    return image_to_text, text_to_image


def contrastive_loss_from_logits(
    logits_per_image: torch.Tensor,
    *,
    beta_image_to_text: float = DEFAULT_BETA,
    beta_text_to_image: float = DEFAULT_BETA,
    include_positive: bool = False,
) -> torch.Tensor:
    """Compute the symmetric loss from the [B, B] logits ``S = I @ T.T / tau`` (row i: image i, column j: text j).

    Returns:
        0-d tensor ``mean_i l_i(S, beta1) + mean_i l_i(S.T, beta2)``, float32 or wider.
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise InvalidInputError(f"logits_per_image must be square [B, B], got {tuple(logits_per_image.shape)}.")
    if logits_per_image.shape[0] < 2:
        raise InvalidInputError("A contrastive loss needs a batch of at least 2 image-text pairs, got 1.")
    positives = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = contrastive_row_losses(
        logits_per_image, positives, beta=beta_image_to_text, include_positive=include_positive
    )
    text_to_image = contrastive_row_losses(
        logits_per_image.T, positives, beta=beta_text_to_image, include_positive=include_positive
    )
    return image_to_text.mean() + text_to_image.mean()


def _feature_loss(image_features, text_features, temperature, beta1, beta2, include_positive) -> torch.Tensor:
    _check_features(image_features, text_features)
    _check_temperature_and_beta(temperature, (beta1, beta2))
    logits_per_image = image_features @ text_features.T / temperature
    return contrastive_loss_from_logits(
        logits_per_image, beta_image_to_text=beta1, beta_text_to_image=beta2, include_positive=include_positive
    )


def dhn_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    beta_image_to_text: float = DEFAULT_BETA,
    beta_text_to_image: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Compute the decoupled hard-negative NCE loss (positive left out of the denominator, weighted negatives).

    Args:
        image_features: [B, D] L2-normalised image embeddings, B >= 2 (not normalised here).
        text_features: [B, D] L2-normalised text embeddings; row i is the caption of image i.
        temperature: tau > 0.
        beta_image_to_text: beta1 >= 0; 0 turns the image-to-text half into DCL.
        beta_text_to_image: beta2 >= 0.

    Returns:
        0-d float tensor (float32 or wider).
    """
    return _feature_loss(image_features, text_features, temperature, beta_image_to_text, beta_text_to_image, False)


def hn_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    beta_image_to_text: float = DEFAULT_BETA,
    beta_text_to_image: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Compute the hard-negative NCE loss: exp(S_ii) with weight 1 plus the weighted negatives in the denominator.

    Shapes and arguments as `dhn_nce_loss`; beta1 = beta2 = 0 gives `info_nce_loss`.
    """
    return _feature_loss(image_features, text_features, temperature, beta_image_to_text, beta_text_to_image, True)


def dcl_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Compute the decoupled contrastive loss: positive left out of the denominator, unweighted negatives.

    Shapes as `dhn_nce_loss`; equals `dhn_nce_loss` with beta1 = beta2 = 0.
    """
    return _feature_loss(image_features, text_features, temperature, 0.0, 0.0, False)


def info_nce_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Compute the symmetric InfoNCE loss of CLIP: cross-entropy of S over texts plus cross-entropy of S.T over images.

    Shapes as `dhn_nce_loss`. The value is the sum, not the mean, of the two cross-entropies.
    """
    return _feature_loss(image_features, text_features, temperature, 0.0, 0.0, True)


class ContrastiveLoss(nn.Module):
    """One of the losses of `LOSS_NAMES` as a module, with its temperature and hardness fixed at construction.

    Args:
        name: ``"dhn-nce"``, ``"hn-nce"``, ``"dcl"`` or ``"infonce"``.
        temperature: tau > 0 (fixed, not learned; the model's own ``logit_scale`` is not used).
        beta_image_to_text: beta1 >= 0, used by dhn-nce and hn-nce only.
        beta_text_to_image: beta2 >= 0, used by dhn-nce and hn-nce only.
    """

    def __init__(
        self,
        name: str = "dhn-nce",
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        beta_image_to_text: float = DEFAULT_BETA,
        beta_text_to_image: float = DEFAULT_BETA,
    ) -> None:
        super().__init__()
        include_positive, uses_beta = loss_settings(name)
        _check_temperature_and_beta(temperature, (beta_image_to_text, beta_text_to_image))
        self.name = name.strip().lower().replace("_", "-")
        self.temperature = float(temperature)
        self.include_positive = include_positive
        self.beta_image_to_text = float(beta_image_to_text) if uses_beta else 0.0
        self.beta_text_to_image = float(beta_text_to_image) if uses_beta else 0.0

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Return the 0-d loss of a batch of [B, D] L2-normalised image and text embeddings, B >= 2."""
        return _feature_loss(
            image_features,
            text_features,
            self.temperature,
            self.beta_image_to_text,
            self.beta_text_to_image,
            self.include_positive,
        )

    def row_losses(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        candidate_image_features: torch.Tensor,
        candidate_text_features: torch.Tensor,
        positive_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the per-query losses of both directions; arguments and shapes as `symmetric_row_losses`."""
        return symmetric_row_losses(
            image_features,
            text_features,
            candidate_image_features,
            candidate_text_features,
            positive_index,
            temperature=self.temperature,
            beta_image_to_text=self.beta_image_to_text,
            beta_text_to_image=self.beta_text_to_image,
            include_positive=self.include_positive,
        )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, temperature={self.temperature}, beta_image_to_text={self.beta_image_to_text}, "
            f"beta_text_to_image={self.beta_text_to_image}"
        )

"""Contrastive losses against a plain float64 loop over the formula, reductions between the losses, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.finetune.losses import (
    ContrastiveLoss,
    contrastive_loss_from_logits,
    dcl_loss,
    dhn_nce_loss,
    hn_nce_loss,
    info_nce_loss,
)

TEMPERATURE = 0.6


def _embeddings(batch: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    return image, text


def _direction_by_loop(similarity: list[list[float]], beta: float, include_positive: bool) -> float:
    """Mean over queries i of -S_ii + log(a exp(S_ii) + sum_{j != i} W_ij exp(S_ij)), one term at a time."""
    batch = len(similarity)
    total = 0.0
    for i in range(batch):
        weight_normaliser = 0.0
        for k in range(batch):
            if k != i:
                weight_normaliser += math.exp(beta * similarity[i][k])
        denominator = math.exp(similarity[i][i]) if include_positive else 0.0
        for j in range(batch):
            if j != i:
                weight = (batch - 1) * math.exp(beta * similarity[i][j]) / weight_normaliser
                denominator += weight * math.exp(similarity[i][j])
        total += -similarity[i][i] + math.log(denominator)
    return total / batch


def _loss_by_loop(image, text, beta1: float, beta2: float, include_positive: bool) -> float:
    batch = image.shape[0]
    similarity = [[float(image[i] @ text[j]) / TEMPERATURE for j in range(batch)] for i in range(batch)]
    transposed = [[similarity[j][i] for j in range(batch)] for i in range(batch)]
    return _direction_by_loop(similarity, beta1, include_positive) + _direction_by_loop(
        transposed, beta2, include_positive
    )


@pytest.mark.parametrize("batch", [2, 3, 7, 16])
@pytest.mark.parametrize("beta", [0.0, 0.15, 1.0])
def test_dhn_nce_matches_formula_loop(batch, beta):
    image, text = _embeddings(batch, seed=batch)
    expected = _loss_by_loop(image, text, beta, beta, include_positive=False)
    loss = dhn_nce_loss(image, text, temperature=TEMPERATURE, beta_image_to_text=beta, beta_text_to_image=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("batch", [2, 3, 7, 16])
@pytest.mark.parametrize("beta", [0.0, 0.15, 1.0])
def test_hn_nce_matches_formula_loop(batch, beta):
    image, text = _embeddings(batch, seed=100 + batch)
    expected = _loss_by_loop(image, text, beta, beta, include_positive=True)
    loss = hn_nce_loss(image, text, temperature=TEMPERATURE, beta_image_to_text=beta, beta_text_to_image=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("batch", [2, 3, 7, 16])
def test_dcl_and_infonce_match_formula_loop(batch):
    image, text = _embeddings(batch, seed=200 + batch)
    expected_dcl = _loss_by_loop(image, text, 0.0, 0.0, include_positive=False)
    expected_infonce = _loss_by_loop(image, text, 0.0, 0.0, include_positive=True)
    assert dcl_loss(image, text, temperature=TEMPERATURE).item() == pytest.approx(expected_dcl, rel=1e-10)
    assert info_nce_loss(image, text, temperature=TEMPERATURE).item() == pytest.approx(expected_infonce, rel=1e-10)


def test_dhn_nce_different_betas_per_direction():
    image, text = _embeddings(7, seed=3)
    expected = _loss_by_loop(image, text, 0.15, 1.0, include_positive=False)
    loss = dhn_nce_loss(image, text, temperature=TEMPERATURE, beta_image_to_text=0.15, beta_text_to_image=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("batch", [2, 7, 16])
def test_dhn_nce_beta_zero_is_dcl(batch):
    image, text = _embeddings(batch, seed=300 + batch)
    dhn = dhn_nce_loss(image, text, temperature=TEMPERATURE, beta_image_to_text=0.0, beta_text_to_image=0.0)
    assert dhn.item() == pytest.approx(dcl_loss(image, text, temperature=TEMPERATURE).item(), rel=1e-12)


@pytest.mark.parametrize("batch", [2, 7, 16])
def test_infonce_is_symmetric_cross_entropy(batch):
    image, text = _embeddings(batch, seed=400 + batch)
    logits_per_image = image @ text.T / TEMPERATURE
    labels = torch.arange(batch)
    expected = F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)
    assert info_nce_loss(image, text, temperature=TEMPERATURE).item() == pytest.approx(expected.item(), rel=1e-12)


def test_hn_nce_beta_zero_is_infonce():
    image, text = _embeddings(9, seed=5)
    hn = hn_nce_loss(image, text, temperature=TEMPERATURE, beta_image_to_text=0.0, beta_text_to_image=0.0)
    assert hn.item() == pytest.approx(info_nce_loss(image, text, temperature=TEMPERATURE).item(), rel=1e-12)


@pytest.mark.parametrize("name", ["dhn-nce", "hn-nce", "dcl", "infonce"])
def test_module_matches_function(name):
    image, text = _embeddings(6, seed=6)
    functions = {
        "dhn-nce": lambda: dhn_nce_loss(image, text, temperature=0.3, beta_image_to_text=0.5, beta_text_to_image=0.2),
        "hn-nce": lambda: hn_nce_loss(image, text, temperature=0.3, beta_image_to_text=0.5, beta_text_to_image=0.2),
        "dcl": lambda: dcl_loss(image, text, temperature=0.3),
        "infonce": lambda: info_nce_loss(image, text, temperature=0.3),
    }
    module = ContrastiveLoss(name, temperature=0.3, beta_image_to_text=0.5, beta_text_to_image=0.2)
    assert module(image, text).item() == pytest.approx(functions[name]().item(), rel=1e-12)


def test_extreme_logits_stay_finite():
    # Temperature 0.01 puts logits near +-100, where exp() of a weighted sum would overflow float32.
    image, text = _embeddings(16, seed=7)
    image, text = image.float(), text.float()
    image.requires_grad_(True)
    loss = dhn_nce_loss(image, text, temperature=0.01, beta_image_to_text=1.0, beta_text_to_image=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(image.grad).all()


def test_float32_matches_float64():
    image, text = _embeddings(16, seed=8)
    high = dhn_nce_loss(image, text)
    low = dhn_nce_loss(image.float(), text.float())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(high.item(), rel=1e-5)


def _planted_logits(batch: int = 8) -> torch.Tensor:
    """Logits with positives at 1/tau, text 1 a hard negative of image 0 (cosine 0.9), text 2 an easy one (-0.5)."""
    generator = torch.Generator().manual_seed(9)
    cosine = 0.2 * torch.rand(batch, batch, generator=generator, dtype=torch.float64)
    cosine.fill_diagonal_(1.0)
    cosine[0, 1] = 0.9
    cosine[0, 2] = -0.5
    return cosine / TEMPERATURE


@pytest.mark.parametrize("beta", [0.0, 0.15, 1.0])
def test_gradient_pushes_hard_negative_harder(beta):
    logits = _planted_logits().requires_grad_(True)
    loss = contrastive_loss_from_logits(logits, beta_image_to_text=beta, beta_text_to_image=beta)
    loss.backward()
    hard, easy = logits.grad[0, 1].item(), logits.grad[0, 2].item()
    # A positive gradient means that gradient descent lowers the similarity, i.e. pushes the pair apart. With a
    # large beta the easy negative's gradient may turn slightly negative, because the weights depend on S too.
    assert hard > 0
    assert hard > abs(easy)


def test_gradient_pushes_every_negative_at_paper_beta():
    logits = _planted_logits().requires_grad_(True)
    contrastive_loss_from_logits(logits, beta_image_to_text=0.15, beta_text_to_image=0.15).backward()
    off_diagonal = logits.grad[~torch.eye(logits.shape[0], dtype=torch.bool)]
    assert (off_diagonal > 0).all()


def test_beta_raises_share_of_hard_negative():
    ratios = {}
    for beta in (0.0, 0.15):
        logits = _planted_logits().requires_grad_(True)
        contrastive_loss_from_logits(logits, beta_image_to_text=beta, beta_text_to_image=beta).backward()
        ratios[beta] = logits.grad[0, 1].item() / logits.grad[0, 2].item()
    assert ratios[0.15] > ratios[0.0]


def test_gradient_pulls_positive_together():
    logits = _planted_logits().requires_grad_(True)
    contrastive_loss_from_logits(logits).backward()
    assert logits.grad[0, 0].item() < 0


def test_batch_of_one_is_rejected():
    image, text = _embeddings(1)
    with pytest.raises(InvalidInputError, match="at least 2"):
        dhn_nce_loss(image, text)


def test_mismatched_shapes_are_rejected():
    image, _ = _embeddings(4)
    _, text = _embeddings(5)
    with pytest.raises(InvalidInputError, match="same shape"):
        dhn_nce_loss(image, text)


def test_invalid_parameters_are_rejected():
    image, text = _embeddings(4)
    with pytest.raises(InvalidInputError, match="Temperature"):
        dhn_nce_loss(image, text, temperature=0.0)
    with pytest.raises(InvalidInputError, match="beta"):
        dhn_nce_loss(image, text, beta_image_to_text=-0.1)
    with pytest.raises(InvalidInputError, match="Unknown contrastive loss"):
        ContrastiveLoss("triplet")

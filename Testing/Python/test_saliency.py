"""Tests of prompt embeddings, CLIP scores, gScoreCAM and GradCAM on the tiny BiomedCLIP-architecture model.

Random weights do not determine where a map should peak, so localisation is tested on a controlled model. It is the
tiny model's own ViT with attention outputs and position embeddings zeroed, so each token depends only on its own
patch, and an image embedding pooled only over the patch tokens of one region. Its prompt score depends on that
region alone.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedCLIPSAMLib import saliency
from MedCLIPSAMLib.errors import CancelledError, InvalidInputError
from MedCLIPSAMLib.imaging import clip_input
from MedCLIPSAMLib.models import load_clip

GRID = 14  # patch grid of a 224-pixel ViT with 16-pixel patches
PATCH = 16
CHANNELS = 64  # width of the tiny image tower
RED_REGION = (2, 5)  # patch rows and columns [start, stop) of the red square
BLUE_REGION = (9, 12)  # patch rows and columns [start, stop) of the blue square


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's tiny-model passes on one thread, then restore the previous count.

    The tiny model's matrices are too small to gain from threads, and on a loaded machine two OpenMP threads
    made 10 forward passes take about 6 s instead of 0.1 s (measured on the 2-core development machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def clip(tiny_clip_id):
    return load_clip(tiny_clip_id, device="cpu")


@pytest.fixture(scope="module")
def image_tensor(clip):
    rgb = np.random.RandomState(0).randint(0, 256, size=(180, 260, 3)).astype(np.uint8)
    tensor, _ = clip_input(rgb, clip.mean, clip.std, size=clip.image_size)
    return tensor


@pytest.fixture(scope="module")
def text_embedding(clip):
    return saliency.encode_prompt(clip, "breast tumor")


@pytest.fixture(scope="module")
def default_map(clip, image_tensor, text_embedding):
    return saliency.gscorecam(clip, image_tensor, text_embedding)


@pytest.fixture(scope="module")
def all_channels_map(clip, image_tensor, text_embedding):
    return saliency.gscorecam(clip, image_tensor, text_embedding, top_k=CHANNELS)


def _reference_activations_and_gradients(clip, image_tensor, text_embedding):
    """Compute norm2 activations [C, 14, 14] and gradients of the logit independently of the library."""
    model = clip.model
    stored = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        stored["tokens"] = output

    handle = model.visual.trunk.blocks[-1].norm2.register_forward_hook(hook)
    try:
        image = image_tensor.clone().requires_grad_(True)  # parameters are frozen: the graph starts at the input
        embedding = F.normalize(model.encode_image(image), dim=-1)[0]
        logit = model.logit_scale.exp() * torch.dot(embedding, F.normalize(text_embedding, dim=0))
        logit.backward()
    finally:
        handle.remove()
    tokens = stored["tokens"][0, 1:, :].detach()
    gradients = stored["tokens"].grad[0, 1:, :]
    activations = tokens.T.reshape(-1, GRID, GRID)
    return activations, gradients.T.reshape(-1, GRID, GRID)


def _normalise_and_resize(cam: torch.Tensor) -> np.ndarray:
    cam = torch.relu(cam)
    cam = (cam - cam.min()) / (cam.max() - cam.min()) if float(cam.max() - cam.min()) > 0 else torch.zeros_like(cam)
    return F.interpolate(cam[None, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0].numpy()


def _logit(model, images, text_embedding):
    embeddings = F.normalize(model.encode_image(images), dim=-1)
    return model.logit_scale.exp() * (embeddings @ F.normalize(text_embedding, dim=0))


# ----------------------------------------------------------------------------------------------------------------------
# Controlled model


class RegionPooledClip(torch.nn.Module):
    """CLIP stand-in whose image embedding is the projected mean of the patch tokens of one square region.

    Uses a copy of the tiny model's image tower with attention outputs and position embeddings zeroed, so each
    token depends on its own patch only. ``encode_image`` is the only entry point the saliency code needs besides
    ``visual.trunk`` and ``logit_scale``.
    """

    def __init__(self, base: torch.nn.Module, region: tuple[int, int]):
        super().__init__()
        self.visual = copy.deepcopy(base.visual)
        self.logit_scale = copy.deepcopy(base.logit_scale)
        with torch.no_grad():
            for block in self.visual.trunk.blocks:
                block.attn.proj.weight.zero_()
                block.attn.proj.bias.zero_()
            self.visual.trunk.pos_embed.zero_()
        inside = torch.zeros(GRID, GRID, dtype=torch.bool)
        inside[region[0] : region[1], region[0] : region[1]] = True
        self.register_buffer("region_index", torch.nonzero(inside.flatten()).flatten())
        self.eval()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = self.visual.trunk.forward_features(images)
        pooled = tokens[:, 1:, :][:, self.region_index, :].mean(dim=1)
        return self.visual.head(pooled)


class ScoreOverrideClip(RegionPooledClip):
    """Controlled model that replaces the embedding of every second no-gradient forward with a constant.

    gScoreCAM runs its masked inputs without gradients. With ``batch_size=1`` every second kept channel gets a
    constant embedding. Its score is then NaN (for a NaN fill) or exactly 0 (for a zero fill, since a normalised
    zero vector stays zero).
    """

    def __init__(self, base: torch.nn.Module, region: tuple[int, int], fill: float):
        super().__init__(base, region)
        self.fill = fill
        self.masked_calls = 0

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        embedding = super().encode_image(images)
        if torch.is_grad_enabled():
            return embedding
        self.masked_calls += 1
        if self.masked_calls % 2 == 0:
            return torch.full_like(embedding, self.fill)
        return embedding


def _two_squares_tensor(clip) -> torch.Tensor:
    rgb = np.full((224, 224, 3), 90, dtype=np.uint8)
    for region, colour in ((RED_REGION, (220, 40, 40)), (BLUE_REGION, (40, 60, 220))):
        start, stop = region[0] * PATCH, region[1] * PATCH
        rgb[start:stop, start:stop] = colour
    tensor, _ = clip_input(rgb, clip.mean, clip.std)
    return tensor


def _controlled(clip, model: torch.nn.Module, name: str):
    return dataclasses.replace(clip, model=model, model_id=f"controlled:{name}")


def _region_mask(region: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((224, 224), dtype=bool)
    mask[region[0] * PATCH : region[1] * PATCH, region[0] * PATCH : region[1] * PATCH] = True
    return mask


@pytest.fixture(scope="module")
def squares(clip):
    return _two_squares_tensor(clip)


@pytest.fixture(scope="module")
def controlled_maps(clip, squares):
    """Per square: the controlled bundle pooled over it, its prompt embedding (that image's own embedding), and
    the gScoreCAM and GradCAM maps."""
    cases = {}
    for region in (RED_REGION, BLUE_REGION):
        model = RegionPooledClip(clip.model, region)
        with torch.no_grad():
            text = F.normalize(model.encode_image(squares)[0], dim=0)
        bundle = _controlled(clip, model, f"region{region}")
        cases[region] = {
            "bundle": bundle,
            "text": text,
            "gscorecam": saliency.gscorecam(bundle, squares, text),
            "gradcam": saliency.gradcam(bundle, squares, text),
        }
    return cases


# ----------------------------------------------------------------------------------------------------------------------
# encode_prompt and clip_score


def test_prompt_embedding_is_unit_vector(text_embedding):
    assert tuple(text_embedding.shape) == (512,)
    assert text_embedding.dtype == torch.float32
    assert float(text_embedding.norm()) == pytest.approx(1.0, abs=1e-5)


def test_prompt_embedding_cached_copy(clip, text_embedding):
    first = saliency.encode_prompt(clip, "breast tumor")
    first.zero_()
    second = saliency.encode_prompt(clip, "breast tumor")
    assert torch.equal(second, text_embedding)


def test_prompt_whitespace_stripped(clip, text_embedding):
    assert torch.equal(saliency.encode_prompt(clip, "  breast tumor \n"), text_embedding)


def test_different_prompts_differ(clip, text_embedding):
    assert not torch.allclose(saliency.encode_prompt(clip, "lung opacity"), text_embedding)


def test_prompt_embedding_ignores_dropout(clip, text_embedding):
    training_copy = dataclasses.replace(clip, model=copy.deepcopy(clip.model).train())
    embedding = saliency.encode_prompt(training_copy, "breast tumor")
    assert torch.allclose(embedding, text_embedding, atol=1e-6)
    assert training_copy.model.training


def test_prompt_cache_separate_per_model(clip, text_embedding):
    # Same model id, different text weights: the cache must not return the first model's embedding.
    changed = copy.deepcopy(clip.model)
    with torch.no_grad():
        changed.text.proj[-1].weight.mul_(-1.0)  # the last projection layer: negates the text embedding
    embedding = saliency.encode_prompt(dataclasses.replace(clip, model=changed), "breast tumor")
    assert torch.allclose(embedding, -text_embedding, atol=1e-5)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_rejected(clip, prompt):
    with pytest.raises(InvalidInputError, match="empty"):
        saliency.encode_prompt(clip, prompt)


def test_non_string_prompt_rejected(clip):
    with pytest.raises(InvalidInputError, match="str"):
        saliency.encode_prompt(clip, 42)


def test_too_long_prompt_rejected(clip):
    with pytest.raises(InvalidInputError, match=r"302 tokens.*256"):
        saliency.encode_prompt(clip, " ".join(["tumor"] * 300))


def test_prompt_at_context_length_accepted(clip):
    embedding = saliency.encode_prompt(clip, " ".join(["tumor"] * 254))  # 254 words + [CLS] + [SEP] = 256
    assert tuple(embedding.shape) == (512,)


def test_clip_score_is_scaled_cosine(clip, image_tensor, text_embedding):
    with torch.no_grad():
        expected = float(_logit(clip.model, image_tensor, text_embedding)[0])
    assert saliency.clip_score(clip, image_tensor, text_embedding) == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# gScoreCAM and GradCAM contracts


def test_gscorecam_map_contract(default_map):
    assert default_map.shape == (224, 224)
    assert default_map.dtype == np.float32
    assert float(default_map.min()) >= 0.0
    assert float(default_map.max()) <= 1.0
    assert float(default_map.max()) > 0.9


def test_gscorecam_deterministic(clip, image_tensor, text_embedding, default_map):
    again = saliency.gscorecam(clip, image_tensor, text_embedding)
    assert np.array_equal(again, default_map)


def test_gscorecam_batch_size_does_not_matter(clip, image_tensor, text_embedding):
    one_at_a_time = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=12, batch_size=1)
    batched = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=12, batch_size=16)
    assert np.allclose(one_at_a_time, batched, atol=1e-5)


def test_gscorecam_top_k_changes_map(clip, image_tensor, text_embedding, all_channels_map):
    single = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=1)
    assert not np.allclose(single, all_channels_map, atol=1e-3)


def test_gscorecam_top_k_above_channels_clamped(clip, image_tensor, text_embedding, all_channels_map):
    with pytest.warns(UserWarning, match="exceeds"):
        clamped = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=300)
    assert np.array_equal(clamped, all_channels_map)


def test_gscorecam_matches_reference(clip, image_tensor, text_embedding):
    """Compare with a plain, unbatched rendition of the method computed in this test."""
    top_k = 5
    activations, gradients = _reference_activations_and_gradients(clip, image_tensor, text_embedding)
    kept_channels = torch.argsort(gradients.mean(dim=(1, 2)), descending=True, stable=True)[:top_k]
    logits = torch.zeros(activations.shape[0])
    with torch.no_grad():
        for channel in kept_channels.tolist():
            upsampled = F.interpolate(
                activations[channel][None, None], size=(224, 224), mode="bilinear", align_corners=True
            )[0, 0]
            mask = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min() + 1e-6)
            logits[channel] = _logit(clip.model, image_tensor * mask, text_embedding)[0]
    weights = torch.softmax(logits, dim=0)
    expected = _normalise_and_resize(torch.einsum("c,chw->hw", weights, activations))

    result = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=top_k, batch_size=2)
    assert np.allclose(result, expected, atol=1e-4)


def test_gradcam_matches_reference(clip, image_tensor, text_embedding):
    activations, gradients = _reference_activations_and_gradients(clip, image_tensor, text_embedding)
    expected = _normalise_and_resize(torch.einsum("c,chw->hw", gradients.mean(dim=(1, 2)), activations))
    result = saliency.gradcam(clip, image_tensor, text_embedding)
    assert result.shape == (224, 224)
    assert result.dtype == np.float32
    assert np.allclose(result, expected, atol=1e-4)


def test_gradcam_deterministic(clip, image_tensor, text_embedding):
    first = saliency.gradcam(clip, image_tensor, text_embedding)
    second = saliency.gradcam(clip, image_tensor, text_embedding)
    assert np.array_equal(first, second)


def test_maps_same_under_inference_mode(clip, image_tensor, text_embedding):
    expected_gradcam = saliency.gradcam(clip, image_tensor, text_embedding)
    expected_gscorecam = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=4)
    with torch.inference_mode():
        inference_gradcam = saliency.gradcam(clip, image_tensor.clone(), text_embedding.clone())
        inference_gscorecam = saliency.gscorecam(clip, image_tensor.clone(), text_embedding.clone(), top_k=4)
    assert np.array_equal(inference_gradcam, expected_gradcam)
    assert np.array_equal(inference_gscorecam, expected_gscorecam)


def test_concurrent_calls_match_sequential(clip, image_tensor, text_embedding):
    """Threads sharing one model get the same maps as sequential calls.

    Without serialisation, one call's forward hook also fires on another thread's forward passes; mixing
    gScoreCAM (many masked forwards) with GradCAM makes that overlap likely.
    """
    expected = {
        "gradcam": saliency.gradcam(clip, image_tensor, text_embedding),
        "gscorecam": saliency.gscorecam(clip, image_tensor, text_embedding, top_k=16, batch_size=1),
    }
    methods = ["gradcam", "gscorecam"] * 2
    results = [None] * len(methods)

    def run(index: int) -> None:
        if methods[index] == "gradcam":
            results[index] = saliency.gradcam(clip, image_tensor, text_embedding)
        else:
            results[index] = saliency.gscorecam(clip, image_tensor, text_embedding, top_k=16, batch_size=1)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(methods))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for method, result in zip(methods, results):
        assert result is not None, method
        assert np.array_equal(result, expected[method]), method


def test_gscorecam_progress_per_batch(clip, image_tensor, text_embedding):
    calls = []
    saliency.gscorecam(
        clip, image_tensor, text_embedding, top_k=10, batch_size=4,
        progress=lambda done, total, message: calls.append((done, total)),
    )
    assert calls == [(4, 10), (8, 10), (10, 10)]


def test_gscorecam_cancel_raises(clip, image_tensor, text_embedding):
    with pytest.raises(CancelledError):
        saliency.gscorecam(clip, image_tensor, text_embedding, cancel=lambda: True)


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"batch_size": 0}, {"top_k": 2.5}, {"batch_size": True}])
def test_gscorecam_invalid_options_rejected(clip, image_tensor, text_embedding, kwargs):
    with pytest.raises(InvalidInputError):
        saliency.gscorecam(clip, image_tensor, text_embedding, **kwargs)


@pytest.mark.parametrize("shape", [(3, 224, 224), (1, 1, 224, 224), (1, 3, 112, 112), (2, 3, 224, 224)])
def test_wrong_image_shape_rejected(clip, text_embedding, shape):
    with pytest.raises(InvalidInputError, match="224|\\[1, 3, S, S\\]"):
        saliency.gscorecam(clip, torch.zeros(shape), text_embedding)


def test_wrong_text_embedding_rejected(clip, image_tensor):
    with pytest.raises(InvalidInputError, match="embedding"):
        saliency.gradcam(clip, image_tensor, torch.zeros(512))


def test_model_state_left_unchanged(clip, image_tensor, text_embedding):
    model = copy.deepcopy(clip.model).train()
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 2 == 0)
    flags_before = [parameter.requires_grad for parameter in model.parameters()]
    bundle = dataclasses.replace(clip, model=model)

    saliency.gscorecam(bundle, image_tensor, text_embedding, top_k=4)
    saliency.gradcam(bundle, image_tensor, text_embedding)

    assert [parameter.requires_grad for parameter in model.parameters()] == flags_before
    assert all(module.training for module in model.modules())
    assert all(not module._forward_hooks for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_bfloat16_model_gives_float32_map(tiny_clip_id, image_tensor, text_embedding, default_map):
    bundle = load_clip(tiny_clip_id, device="cpu", dtype=torch.bfloat16)
    result = saliency.gscorecam(bundle, image_tensor, text_embedding)
    assert result.dtype == np.float32
    assert float(result.min()) >= 0.0
    assert float(result.max()) <= 1.0
    assert np.corrcoef(result.ravel(), default_map.ravel())[0, 1] > 0.95


# ----------------------------------------------------------------------------------------------------------------------
# Localisation on the controlled model


@pytest.mark.parametrize("region", [RED_REGION, BLUE_REGION], ids=["red", "blue"])
def test_gscorecam_highlights_pooled_region(controlled_maps, region):
    result = controlled_maps[region]["gscorecam"]
    inside = _region_mask(region)
    peak = np.unravel_index(int(result.argmax()), result.shape)
    assert inside[peak]
    assert result[inside].mean() > 2.0 * result[~inside].mean()


def test_gscorecam_peak_moves_with_region(controlled_maps):
    red_map = controlled_maps[RED_REGION]["gscorecam"]
    blue_map = controlled_maps[BLUE_REGION]["gscorecam"]
    red_peak = np.unravel_index(int(red_map.argmax()), red_map.shape)
    blue_peak = np.unravel_index(int(blue_map.argmax()), blue_map.shape)
    assert _region_mask(RED_REGION)[red_peak]
    assert _region_mask(BLUE_REGION)[blue_peak]


@pytest.mark.parametrize("region", [RED_REGION, BLUE_REGION], ids=["red", "blue"])
def test_gradcam_differs_from_gscorecam(controlled_maps, region):
    """GradCAM and gScoreCAM weight the same activations differently, so their maps differ.

    Here the prompt embedding equals the image embedding, so the cosine is at its maximum and its gradient is
    zero up to rounding. GradCAM's weights then carry no information about the pooled square. gScoreCAM's weights
    come from the scores of masked inputs, which drop when the pooled square is masked out. So gScoreCAM's
    contrast between the square and the rest must be the larger one.
    """
    gradient_map = controlled_maps[region]["gradcam"]
    score_map = controlled_maps[region]["gscorecam"]
    inside = _region_mask(region)
    gradient_contrast = gradient_map[inside].mean() - gradient_map[~inside].mean()
    score_contrast = score_map[inside].mean() - score_map[~inside].mean()
    assert not np.allclose(gradient_map, score_map, atol=1e-2)
    assert score_contrast > gradient_contrast


def test_nan_channel_scores_count_as_zero(clip, squares):
    """A NaN masked score gives the same weights, and so the same map, as a score of exactly 0."""
    maps = {}
    for fill in (float("nan"), 0.0):
        model = ScoreOverrideClip(clip.model, RED_REGION, fill)
        with torch.no_grad():
            text = F.normalize(RegionPooledClip.encode_image(model, squares)[0], dim=0)
        bundle = _controlled(clip, model, f"override{fill}")
        maps[str(fill)] = saliency.gscorecam(bundle, squares, text, top_k=8, batch_size=1)
        assert model.masked_calls == 8

    plain_model = RegionPooledClip(clip.model, RED_REGION)
    with torch.no_grad():
        text = F.normalize(plain_model.encode_image(squares)[0], dim=0)
    plain = saliency.gscorecam(_controlled(clip, plain_model, "plain"), squares, text, top_k=8, batch_size=1)

    assert np.isfinite(maps["nan"]).all()
    assert np.array_equal(maps["nan"], maps["0.0"])
    assert not np.allclose(maps["nan"], plain, atol=1e-3)

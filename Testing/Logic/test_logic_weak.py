"""The Logic with a trained weak-supervision network: same outputs as the zero-shot pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedCLIPSAMLib.weak.predict import WeakSegmenter
from MedCLIPSAMLib.weak.train import WeakTrainConfig, make_checkpoint, save_checkpoint
from MedCLIPSAMLib.weak.unet import ResidualUNet
from MedCLIPSAMModule import mrml
from MedCLIPSAMModule.logic import MedCLIPSAMLogic, SegmenterSettings


@pytest.fixture(scope="module")
def weak_checkpoint(tmp_path_factory):
    """A small residual U-Net checkpoint in the format `medclipsam weak-train` writes (random weights)."""
    torch.manual_seed(0)
    config = WeakTrainConfig(image_size=32, base_channels=4, depth=2, device="cpu")
    model = ResidualUNet(base_channels=config.base_channels, depth=config.depth).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    checkpoint = make_checkpoint(
        model, optimizer, config, epochs_completed=1, best_val_dice=0.5, best_epoch=1,
        epochs_without_improvement=0, finished=True, history=[],
    )
    return save_checkpoint(tmp_path_factory.mktemp("weak") / "best.pt", checkpoint)


def test_weak_checkpoint_replaces_zero_shot(scene, weak_checkpoint):
    generator = np.random.default_rng(0)
    volume = generator.normal(50, 10, size=(4, 40, 36)).astype(np.float32)
    ijk_to_ras = np.diag([0.7, 0.8, 3.0, 1.0])
    ijk_to_ras[:3, 3] = (5.0, -6.0, 7.0)
    input_node = mrml.addScalarVolumeFromArray(scene, volume, ijk_to_ras, "input")
    logic = MedCLIPSAMLogic(scene)
    settings = SegmenterSettings(weakModelCheckpoint=str(weak_checkpoint), device="cpu")

    outcome = logic.segmentVolume(input_node, "lung", settings=settings, sliceRange=(1, 3))

    assert isinstance(logic.segmenter, WeakSegmenter)
    assert outcome.processedSlices == [1, 2]
    assert outcome.segmentationNode.GetSegmentation().GetSegment(outcome.segmentId).GetName() == "lung"
    probability = mrml.arrayFromVolumeNode(outcome.saliencyNode)
    assert np.allclose(mrml.ijkToRasArray(outcome.saliencyNode), ijk_to_ras)
    assert probability.shape == volume.shape
    assert float(probability[1:3].min()) > 0.0  # sigmoid output is positive on every processed voxel
    assert not probability[[0, 3]].any()


def test_segmenter_cached_until_settings_change(scene, weak_checkpoint):
    logic = MedCLIPSAMLogic(scene)
    settings = SegmenterSettings(weakModelCheckpoint=str(weak_checkpoint), device="cpu")

    first = logic.getSegmenter(settings)
    again = logic.getSegmenter(SegmenterSettings(weakModelCheckpoint=str(weak_checkpoint), device="cpu"))
    changed = logic.getSegmenter(SegmenterSettings(weakModelCheckpoint=str(weak_checkpoint), device="cpu", topK=5))

    assert again is first
    assert changed is not first

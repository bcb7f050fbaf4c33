"""Residual U-Net: output shapes over a grid of sizes, widths and depths, structure, and argument checks."""

from __future__ import annotations

import pytest
import torch

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.weak.unet import ResidualUNet, ResidualUnit

SIZES = [(1, 1), (7, 13), (33, 17), (64, 64), (95, 31)]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("base_channels", [1, 3])
def test_unet_any_size_shape(depth, base_channels):
    torch.manual_seed(0)
    net = ResidualUNet(in_channels=1, out_channels=1, base_channels=base_channels, depth=depth).eval()
    for height, width in SIZES:
        with torch.no_grad():
            logits = net(torch.randn(1, 1, height, width))
        assert logits.shape == (1, 1, height, width), (height, width)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_unet_channels_and_upsampling():
    net = ResidualUNet(in_channels=3, out_channels=2, base_channels=4, depth=2, upsample="nearest").eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 21, 10))
    assert logits.shape == (1, 2, 21, 10)


def test_unet_train_mode_backward():
    net = ResidualUNet(base_channels=4, depth=3).train()
    logits = net(torch.randn(2, 1, 40, 24))
    logits.mean().backward()
    gradients = [parameter.grad for parameter in net.parameters()]
    assert all(gradient is not None for gradient in gradients)


def test_unet_crop_matches_unpadded_input():
    """An input that is already a multiple of 2**depth is not padded, so cropping changes nothing there."""
    torch.manual_seed(0)
    net = ResidualUNet(base_channels=4, depth=2).eval()
    image = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        first = net(image)
        second = net(image.clone())
    assert torch.equal(first, second)


def test_unet_widths_double_per_level():
    net = ResidualUNet(base_channels=3, depth=3)
    assert net.stem.conv1.out_channels == 3
    assert [unit.conv1.out_channels for unit in net.encoder] == [6, 12]
    assert net.bridge.conv1.out_channels == 24
    assert [unit.conv1.out_channels for unit in net.decoder] == [12, 6, 3]
    assert net.bridge.conv1.stride == (2, 2)


def test_residual_unit_shortcuts():
    identity_unit = ResidualUnit(4, 4, stride=1)
    projection_unit = ResidualUnit(4, 8, stride=2)
    assert isinstance(identity_unit.shortcut, torch.nn.Identity)
    assert isinstance(projection_unit.shortcut[0], torch.nn.Conv2d)
    assert projection_unit.shortcut[0].kernel_size == (1, 1)
    output = projection_unit.eval()(torch.randn(1, 4, 9, 9))
    assert output.shape == (1, 8, 5, 5)


def test_unet_config_roundtrip():
    net = ResidualUNet(in_channels=1, out_channels=1, base_channels=6, depth=2, upsample="nearest")
    rebuilt = ResidualUNet(**net.config)
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.config == net.config


@pytest.mark.parametrize(
    "arguments",
    [
        {"base_channels": 0},
        {"base_channels": 2.5},
        {"depth": 0},
        {"depth": 9},
        {"in_channels": -1},
        {"out_channels": True},
        {"upsample": "bicubic"},
    ],
)
def test_unet_invalid_arguments(arguments):
    with pytest.raises(InvalidInputError):
        ResidualUNet(**arguments)


def test_unet_invalid_argument_message():
    with pytest.raises(InvalidInputError, match="depth must be at most 8, got 12"):
        ResidualUNet(depth=12)


def test_unet_wrong_input_shape():
    net = ResidualUNet(in_channels=1, base_channels=2, depth=1)
    with pytest.raises(InvalidInputError, match=r"expects input \[B, 1, H, W\], got shape \(1, 3, 8, 8\)"):
        net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidInputError):
        net(torch.zeros(8, 8))

"""Deep residual U-Net for binary segmentation (ResUNet: Zhang, Liu and Wang, "Road Extraction by
Deep Residual U-Net", IEEE Geoscience and Remote Sensing Letters, 2018).

The network follows the paper's layout at a configurable width and depth:

* encoder: a stem unit (conv, BN-ReLU-conv, 1x1 projection shortcut) at full resolution, then ``depth - 1``
  residual units that halve the resolution with a stride-2 first convolution;
* bridge: one more stride-2 residual unit (``depth`` halvings in total);
* decoder: ``depth`` stages of 2x upsampling, concatenation with the encoder feature of the same resolution and a
  residual unit;
* head: a 1x1 convolution to ``out_channels`` logits. Apply a sigmoid at inference.

Every residual unit is pre-activation (BN-ReLU-conv3x3, BN-ReLU-conv3x3) with an identity shortcut, or a 1x1
convolution plus BN when the channel count or the stride changes. Channels double at each halving: level ``i``
has ``base_channels * 2**i`` channels, the bridge ``base_channels * 2**depth``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from MedCLIPSAMLib.errors import InvalidInputError

__all__ = ["UPSAMPLE_MODES", "ResidualUNet", "ResidualUnit"]

UPSAMPLE_MODES = ("nearest", "bilinear")
"""Interpolation of the decoder's 2x upsampling."""

_MAX_DEPTH = 8  # depth 8 already pads inputs to multiples of 256 pixels


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus a shortcut.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: 1 keeps the resolution, 2 halves it (ceil for odd sizes).
        first: True for the stem unit, whose input is the raw image: its first convolution comes before any
            BN-ReLU, as in the paper's first encoder block.

    Shapes: input [B, in_channels, H, W] -> output [B, out_channels, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, first: bool = False) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        if stride not in (1, 2):
            raise InvalidInputError(f"stride must be 1 or 2, got {stride!r}.")
        self.first = first
        self.pre_activation = nn.Identity() if first else nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn_relu = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU())
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(self.bn_relu(self.conv1(self.pre_activation(x))))
        return residual + self.shortcut(x)


class ResidualUNet(nn.Module):
    """Deep residual U-Net that maps an image batch to per-pixel logits of the same size.

    Args:
        in_channels: image channels (1 for the grayscale input that `MedCLIPSAMLib.weak.data` prepares).
        out_channels: logit channels (1 for binary segmentation).
        base_channels: width of the full-resolution level; level ``i`` has ``base_channels * 2**i`` channels.
        depth: number of 2x downsamplings (encoder levels plus bridge), 1 to 8.
        upsample: decoder interpolation, one of `UPSAMPLE_MODES`.

    Any input size works: `forward` pads H and W up to a multiple of ``2**depth`` (replicating the border
    pixels) and crops the logits back.

    Shapes: input [B, in_channels, H, W] float32 (normalised image) -> logits [B, out_channels, H, W] float32
    (unbounded; ``torch.sigmoid(logits)`` is the foreground probability in [0, 1]).

    Example:
        >>> net = ResidualUNet(in_channels=1, out_channels=1, base_channels=16, depth=3)
        >>> net(torch.zeros(2, 1, 100, 75)).shape
        torch.Size([2, 1, 100, 75])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 3,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("base_channels", base_channels)
        _check_positive_int("depth", depth)
        if depth > _MAX_DEPTH:
            raise InvalidInputError(f"depth must be at most {_MAX_DEPTH}, got {depth}.")
        if upsample not in UPSAMPLE_MODES:
            raise InvalidInputError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.depth = depth
        self.upsample = upsample

        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.stem = ResidualUnit(in_channels, widths[0], stride=1, first=True)
        self.encoder = nn.ModuleList(
            ResidualUnit(widths[level - 1], widths[level], stride=2) for level in range(1, depth)
        )
        self.bridge = ResidualUnit(widths[depth - 1], widths[depth], stride=2)
        # Decoder stage for level i (from depth - 1 down to 0) takes the upsampled level i + 1 feature
        # concatenated with the encoder's level i feature.
        self.decoder = nn.ModuleList(
            ResidualUnit(widths[level + 1] + widths[level], widths[level], stride=1)
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    @property
    def config(self) -> dict[str, object]:
        """Constructor arguments, as stored in checkpoints."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "upsample": self.upsample,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InvalidInputError(
                f"ResidualUNet expects input [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}."
            )
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_bottom = -height % multiple
        pad_right = -width % multiple
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate")

        skips = [self.stem(x)]
        for unit in self.encoder:
            skips.append(unit(skips[-1]))
        feature = self.bridge(skips[-1])
        for unit, skip in zip(self.decoder, reversed(skips)):
            if self.upsample == "nearest":
                feature = F.interpolate(feature, size=skip.shape[-2:], mode="nearest")
            else:
                feature = F.interpolate(feature, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            feature = unit(torch.cat([feature, skip], dim=1))
        logits = self.head(feature)
        return logits[..., :height, :width]

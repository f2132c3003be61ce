"""Residual convolutional encoder and decoder for images (C, H, W), after diffusers' autoencoders: per
level a residual block (GroupNorm, SiLU, 3×3 conv, twice, plus the input), then a stride-2 conv down
or a nearest-neighbour ×2 and a 3×3 conv up. Records stay flat at the boundary, as vae.conv's."""
from __future__ import annotations

import torch
from torch import nn

from vae.conv import ConvDecoder, ConvEncoder

GROUPS = 8
"""GroupNorm groups: every channel count of a resconv model is a multiple of it."""


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(GROUPS, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(GROUPS, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # (B, cin, h, w) -> (B, cout, h, w)
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class ResConvEncoder(ConvEncoder):
    """vae.conv's encoder (head and forward) over a residual body."""

    @staticmethod
    def body(c: int, channels: tuple[int, ...]) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(c, channels[0], 3, padding=1)]
        cin = channels[0]
        for ch in channels:  # each level halves H and W
            layers += [ResBlock(cin, ch), nn.Conv2d(ch, ch, kernel_size=4, stride=2, padding=1)]
            cin = ch
        return layers + [nn.GroupNorm(GROUPS, cin), nn.SiLU()]


class ResConvDecoder(ConvDecoder):
    """vae.conv's decoder (first linear layer and forward) over a residual body."""

    fc_activation = staticmethod(nn.Identity())   # the first residual block normalises and activates

    @staticmethod
    def body(c: int, channels: tuple[int, ...]) -> list[nn.Module]:
        layers: list[nn.Module] = []
        cin = channels[-1]
        for cout in reversed(channels):  # each level doubles H and W
            layers += [ResBlock(cin, cout), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(cout, cout, 3, padding=1)]
            cin = cout
        return layers + [nn.GroupNorm(GROUPS, cin), nn.SiLU(), nn.Conv2d(cin, c, 3, padding=1)]

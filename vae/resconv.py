"""Residual convolutional encoder and decoder for images (C, H, W), after diffusers' autoencoders: per
level a residual block (GroupNorm, SiLU, 3×3 conv, twice, plus the input), then a stride-2 conv down
or a nearest-neighbour ×2 and a 3×3 conv up. Records stay flat at the boundary, as vae.conv's."""
from __future__ import annotations

import torch
from torch import nn

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


class ResConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        layers: list[nn.Module] = [nn.Conv2d(c, channels[0], 3, padding=1)]
        cin = channels[0]
        for ch in channels:  # each level halves H and W
            layers += [ResBlock(cin, ch), nn.Conv2d(ch, ch, kernel_size=4, stride=2, padding=1)]
            cin = ch
        layers += [nn.GroupNorm(GROUPS, cin), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        k = 2 ** len(channels)
        self.head = nn.Linear(cin * (h // k) * (w // k), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C*H*W)
        h = self.conv(x.view(x.shape[0], *self.input_shape))                # (B, C', H/k, W/k)
        mean, logvar = self.head(h.flatten(1)).chunk(2, dim=-1)             # (B, L), (B, L)
        return mean, logvar


class ResConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        k = 2 ** len(channels)
        self.start = (channels[-1], h // k, w // k)
        self.fc = nn.Linear(latent_dim, channels[-1] * (h // k) * (w // k))
        layers: list[nn.Module] = []
        cin = channels[-1]
        for cout in reversed(channels):  # each level doubles H and W
            layers += [ResBlock(cin, cout), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(cout, cout, 3, padding=1)]
            cin = cout
        layers += [nn.GroupNorm(GROUPS, cin), nn.SiLU(), nn.Conv2d(cin, c, 3, padding=1)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, C*H*W)
        h = self.fc(z).view(z.shape[0], *self.start)                       # (B, C', H/k, W/k)
        return self.deconv(h).flatten(1)

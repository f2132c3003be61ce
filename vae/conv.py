"""Convolutional encoder and decoder for images (C, H, W); records stay flat at the boundary."""
from __future__ import annotations

import torch
from torch import nn


class ConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        layers: list[nn.Module] = []
        for ch in channels:  # each layer halves H and W
            layers += [nn.Conv2d(c, ch, kernel_size=4, stride=2, padding=1), nn.SiLU()]
            c = ch
        self.conv = nn.Sequential(*layers)
        k = 2 ** len(channels)
        self.head = nn.Linear(c * (h // k) * (w // k), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C*H*W)
        h = self.conv(x.view(x.shape[0], *self.input_shape))                # (B, C', H/k, W/k)
        mean, logvar = self.head(h.flatten(1)).chunk(2, dim=-1)             # (B, L), (B, L)
        return mean, logvar


class ConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        k = 2 ** len(channels)
        self.start = (channels[-1], h // k, w // k)
        self.fc = nn.Linear(latent_dim, channels[-1] * (h // k) * (w // k))
        layers: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), c]
        cin = channels[-1]
        for i, cout in enumerate(outs):  # each layer doubles H and W
            layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(nn.SiLU())
            cin = cout
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, C*H*W)
        h = nn.functional.silu(self.fc(z)).view(z.shape[0], *self.start)
        return self.deconv(h).flatten(1)

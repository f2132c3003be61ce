"""Convolutional encoder and decoder for images (C, H, W); records stay flat at the boundary."""
from __future__ import annotations

import torch
from torch import nn


class ConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        self.conv = nn.Sequential(*self.body(c, channels))
        k = 2 ** len(channels)
        self.head = nn.Linear(channels[-1] * (h // k) * (w // k), 2 * latent_dim)

    @staticmethod
    def body(c: int, channels: tuple[int, ...]) -> list[nn.Module]:
        """The layers from C input channels to channels[-1] at H/k × W/k (vae.resconv has its own)."""
        layers: list[nn.Module] = []
        for ch in channels:  # each layer halves H and W
            layers += [nn.Conv2d(c, ch, kernel_size=4, stride=2, padding=1), nn.SiLU()]
            c = ch
        return layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C*H*W)
        h = self.conv(x.view(x.shape[0], *self.input_shape))                # (B, C', H/k, W/k)
        mean, logvar = self.head(h.flatten(1)).chunk(2, dim=-1)             # (B, L), (B, L)
        return mean, logvar


class ConvDecoder(nn.Module):
    fc_activation = staticmethod(nn.functional.silu)   # after the first linear layer (vae.resconv: none)

    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        k = 2 ** len(channels)
        self.start = (channels[-1], h // k, w // k)
        self.fc = nn.Linear(latent_dim, channels[-1] * (h // k) * (w // k))
        self.deconv = nn.Sequential(*self.body(c, channels))

    @staticmethod
    def body(c: int, channels: tuple[int, ...]) -> list[nn.Module]:
        """The layers from channels[-1] at H/k × W/k back to C channels at H × W."""
        layers: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), c]
        cin = channels[-1]
        for i, cout in enumerate(outs):  # each layer doubles H and W
            layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(nn.SiLU())
            cin = cout
        return layers

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, C*H*W)
        h = self.fc_activation(self.fc(z)).view(z.shape[0], *self.start)
        return self.deconv(h).flatten(1)

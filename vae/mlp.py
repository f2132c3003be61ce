"""MLP encoder and decoder for vector records."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, input_dim: int, hidden: tuple[int, ...], latent_dim: int):
        super().__init__()
        self.net = mlp([input_dim, *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, D)
        mean, logvar = self.net(x).chunk(2, dim=-1)                          # (B, L), (B, L)
        return mean, logvar


class MLPDecoder(nn.Module):
    def __init__(self, input_dim: int, hidden: tuple[int, ...], latent_dim: int):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden), input_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, D) likelihood parameters
        return self.net(z)

"""Discriminator heads on the frozen teacher's token features (LADD, section 3.2).

One small 2D-convolutional head per tapped block. Each head is conditioned on the re-noising level
t_hat and the pooled text embedding in projection-discriminator style (Miyato & Koyama, 2018):
logit = conv_out(h) + <h, proj(cond)>, giving a logit map (B, 1, h, w) per head.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ladd_ds.core.flow import TIMESTEP_SCALE


def _groups(channels: int) -> int:
    """Largest group count <= 32 that divides `channels` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, 33) if channels % g == 0)


class DiscriminatorHead(nn.Module):
    def __init__(self, in_channels: int, *, hidden: int, cond_dim: int, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.GroupNorm(_groups(in_channels), in_channels)]
        channels = in_channels
        for _ in range(num_layers):
            # No conv bias: the GroupNorm right after it cancels any per-channel constant.
            layers += [nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU()]
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.to_logit = nn.Conv2d(hidden, 1, 1)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, feature: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(feature)  # (B, hidden, h, w)
        proj = self.cond_proj(cond)[:, :, None, None]  # (B, hidden, 1, 1)
        return self.to_logit(h) + self.scale * (h * proj).sum(dim=1, keepdim=True)  # (B, 1, h, w)


class DiscriminatorHeads(nn.Module):
    """All heads plus the shared conditioning embedding of (t_hat, pooled text)."""

    def __init__(self, feature_dim: int, *, num_heads: int, pooled_dim: int, hidden: int = 64, num_layers: int = 2):
        super().__init__()
        cond_dim = hidden
        # Sinusoidal timestep features as in the SD3 transformer's own time embedding.
        self.time_proj = Timesteps(num_channels=cond_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cond_dim, cond_dim)
        self.text_embed = nn.Sequential(nn.Linear(pooled_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.heads = nn.ModuleList(
            DiscriminatorHead(feature_dim, hidden=hidden, cond_dim=cond_dim, num_layers=num_layers) for _ in range(num_heads)
        )

    def forward(self, features: list[torch.Tensor], t_hat: torch.Tensor, pooled: torch.Tensor) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} heads")
        t_feat = self.time_proj(t_hat.float() * TIMESTEP_SCALE).to(pooled.dtype)  # (B, cond)
        cond = self.time_embed(t_feat) + self.text_embed(pooled)  # (B, cond)
        return [head(f, cond) for head, f in zip(self.heads, features)]  # K x (B, 1, h, w)

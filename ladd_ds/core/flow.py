"""Rectified-flow math shared by LADD, sampling and DPO.

Convention (SD3): ``x_t = (1 - t) * x0 + t * eps`` with ``t = 1`` pure noise; the network predicts
the velocity ``v = eps - x0``; diffusers' SD3 transformer takes ``timestep = 1000 * t``.
"""

from __future__ import annotations

import torch

TIMESTEP_SCALE = 1000.0  # diffusers' SD3Transformer2DModel expects t in [0, 1000]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) fp32, so it broadcasts against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).float()


# The mixing is computed in fp32 and cast back to x's dtype: t itself stays fp32 everywhere (a bf16
# t = 0.75 is 0.75 but t = 0.7 is 0.69921875, and the same t becomes the timestep embedding).
def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, in x0's dtype."""
    tb = _bcast(t, x0)
    return ((1.0 - tb) * x0.float() + tb * eps.float()).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t v, in x_t's dtype."""
    return (x_t.float() - _bcast(t, x_t) * v.float()).to(x_t.dtype)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def sample_logit_normal(shape, mean: float = 0.0, std: float = 1.0, generator=None, device=None):
    """t = sigmoid(mean + std * n), n ~ N(0, 1): SD3's training-time density; LADD's re-noising."""
    n = torch.randn(shape, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> s t / (1 + (s - 1) t): the schedule shift of SD3's sampler (diffusers'
    FlowMatchEulerDiscreteScheduler), which SD3 also applies to its logit-normal training times
    (s = 3 at 1024 px: Esser et al. 2024, "resolution-dependent shifting"; diffusers' SD3
    training scripts index the shifted scheduler's table with the logit-normal draw). Moves times
    towards noise for s > 1; s = 1 returns t itself, unchanged to the bit."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class StudentTimesteps:
    """The student's discrete input timesteps and their probabilities, with a warm-up phase.

    The paper draws t_s from {1, .75, .5, .25} with probabilities [.7, .1, .1, .1]; for high
    resolutions it first trains ~500 iterations with [0, 0, .5, .5] (low noise only).
    """

    def __init__(self, timesteps, probs, warmup_probs=None, warmup_steps: int = 0):
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)
        self.probs = torch.tensor(probs, dtype=torch.float32)
        self.warmup_probs = None if warmup_probs is None else torch.tensor(warmup_probs, dtype=torch.float32)
        self.warmup_steps = warmup_steps

    def probs_at(self, step: int) -> torch.Tensor:
        if self.warmup_probs is not None and step < self.warmup_steps:
            return self.warmup_probs
        return self.probs

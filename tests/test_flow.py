import math

import torch

from ladd_ds.core import flow


def test_x0_recovered_from_xt_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 6, 8, generator=g)
    eps = torch.randn(5, 4, 6, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    x_t = flow.add_noise(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-5, rtol=0)
    # t = 1 is pure noise, t = 0 the clean latent.
    torch.testing.assert_close(x_t[-1], eps[-1])
    torch.testing.assert_close(x_t[0], x0[0])


def test_logit_normal_median_and_range():
    g = torch.Generator().manual_seed(1)
    t = flow.sample_logit_normal((200_000,), mean=1.0, std=1.0, generator=g)
    assert t.min() > 0 and t.max() < 1
    # The median of sigmoid(m + s n) is sigmoid(m): the paper's m=1 biases toward high noise.
    assert abs(t.median().item() - 1 / (1 + math.exp(-1.0))) < 0.005
    t0 = flow.sample_logit_normal((200_000,), mean=0.0, std=1.0, generator=g)
    assert abs(t0.median().item() - 0.5) < 0.005


def test_warmup_switches_student_timestep_probabilities():
    ts = flow.StudentTimesteps([1.0, 0.75, 0.5, 0.25], [0.7, 0.1, 0.1, 0.1], warmup_probs=[0, 0, 0.5, 0.5], warmup_steps=500)
    g = torch.Generator().manual_seed(2)
    early = ts.sample(4000, step=499, generator=g)
    assert set(early.unique().tolist()) == {0.5, 0.25}  # low noise only during warm-up
    late = ts.sample(4000, step=500, generator=g)
    assert (late == 1.0).float().mean().item() > 0.65
    assert set(late.unique().tolist()) == {1.0, 0.75, 0.5, 0.25}


def test_schedule_shift_matches_sd3_formula():
    t = torch.linspace(0, 1, 11)
    s = flow.shift_timesteps(t, 3.0)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    assert s[0] == 0 and s[-1] == 1 and torch.all(s >= t)  # shift > 1 spends more steps at high noise

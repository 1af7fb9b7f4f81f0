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


def draws(step: int, n: int = 4000, **ladd):
    """`LADDSteps.draw_noise` (the draws training uses) for n samples of a (1, 2, 2) latent."""
    from ladd_ds.config import load_config
    from ladd_ds.ladd.steps import LADDSteps
    from tests.conftest import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, [f"ladd.{k}={v}" for k, v in ladd.items()])
    steps = LADDSteps(cfg, engines=None, taps=[], device=torch.device("cpu"))
    steps.step = step
    return steps.draw_noise({"latent": torch.zeros(n, 1, 2, 2), "sample_id": torch.arange(n)})


def test_student_timesteps_follow_the_probabilities_and_the_warm_up():
    warm = {"student_timesteps": "[1.0, 0.75, 0.5, 0.25]", "student_probs": "[0.7, 0.1, 0.1, 0.1]"}
    warm |= {"warmup_probs": "[0, 0, 0.5, 0.5]", "warmup_steps": 500}
    early = draws(499, **warm).t_student
    assert set(early.unique().tolist()) == {0.5, 0.25}  # low noise only during the warm-up
    late = draws(500, **warm).t_student
    freq = [(late == t).float().mean().item() for t in (1.0, 0.75, 0.5, 0.25)]
    # 4000 draws: the standard error of a frequency p is sqrt(p (1 - p) / 4000) <= 0.008
    for f, p in zip(freq, (0.7, 0.1, 0.1, 0.1)):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / 4000), freq


def test_renoising_levels_are_logit_normal_and_independent_streams():
    """t_hat = sigmoid(m + s n): median sigmoid(m), and the real and fake draws, and the student's
    noise, are separate streams (not the same numbers reused)."""
    noise = draws(0, renoise_m=1.0, renoise_s=1.0)
    for t in (noise.t_fake, noise.t_real):
        assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
        # median of 4000 draws: standard error about 1.25 / sqrt(4000) in n, 0.004 in t
        assert abs(t.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02
    assert abs(torch.corrcoef(torch.stack([noise.t_fake, noise.t_real]))[0, 1].item()) < 0.1
    assert not torch.equal(noise.eps_fake, noise.eps_real) and not torch.equal(noise.eps_fake, noise.eps_student)
    shifted = draws(0, renoise_m=-1.0, renoise_s=1.0).t_fake
    assert abs(shifted.median().item() - 1 / (1 + math.exp(1.0))) < 0.02

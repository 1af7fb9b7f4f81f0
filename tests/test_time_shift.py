"""The teacher's schedule shift: read from a diffusers folder's scheduler config (what `ladd-ds
sample` and `pairs` sample with), and DPO's training times shifted by it (SD3's shifted
logit-normal density)."""

import json
import math
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ladd_ds.config import load_config
from ladd_ds.core.errors import InputError
from ladd_ds.core.noise import per_sample_generators, randn_per_sample
from ladd_ds.dpo.steps import DPOSteps, dpo_time_shift
from ladd_ds.models.scheduler import DEFAULT_SHIFT, MODEL_INFO, SCHEDULER_CONFIG, model_sampler_settings, scheduler_settings
from ladd_ds.sampling import load_sampling_model, sample_latents
from tests.conftest import REPO

DPO_CONFIG = REPO / "configs" / "tiny_dpo_cpu.yaml"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def folder_with_scheduler(teacher, out, **scheduler):
    """A copy of the demo teacher folder with diffusers' scheduler/ (written by diffusers itself)
    and no shift in its ladd_model.json."""
    shutil.copytree(teacher, out)
    info = json.loads((out / MODEL_INFO).read_text())
    del info["shift"]
    (out / MODEL_INFO).write_text(json.dumps(info))
    FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(out / "scheduler")
    return out


# ------------------------------------------------------------------ the folder's scheduler config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampler_uses_the_shift_and_table_of_the_folders_scheduler(small_demo_teacher, tmp_path, precision):
    folder = folder_with_scheduler(small_demo_teacher, tmp_path / "teacher", shift=2.0, num_train_timesteps=500)
    sm = load_sampling_model(folder, precision=precision)
    assert (sm.shift, sm.num_train_timesteps) == (2.0, 500)
    assert sm.transformer.dtype == PRECISIONS[precision]

    def sample(model):
        return sample_latents(model, ["a red seven in the top left"] * 2, [3, 4], height=16, width=16, steps=2, cfg=2.0)

    got = sample(sm)
    # The same transformer with the settings given by hand: the folder's were the ones used...
    ref = load_sampling_model(small_demo_teacher, precision=precision)
    ref.shift, ref.num_train_timesteps = 2.0, 500
    torch.testing.assert_close(got, sample(ref), rtol=0, atol=0)
    # ...and each matters: the old fallback (shift 3) and a 1000-step table sample otherwise.
    for shift, table in ((DEFAULT_SHIFT, 500), (2.0, 1000)):
        ref.shift, ref.num_train_timesteps = shift, table
        assert (sample(ref).float() - got.float()).abs().max() > 1e-3, (shift, table)


def test_shift_sources_and_unsupported_scheduler_settings(small_demo_teacher, tmp_path):
    # The demo teacher has no scheduler/: its ladd_model.json shift; a preset: SD3's 3.
    recorded = json.loads((small_demo_teacher / MODEL_INFO).read_text())["shift"]
    assert model_sampler_settings(str(small_demo_teacher)).shift == recorded
    assert model_sampler_settings("tiny").shift == DEFAULT_SHIFT
    # A scheduler config without "shift" gets diffusers' default, as diffusers would load it.
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    assert scheduler_settings(path).shift == FlowMatchEulerDiscreteScheduler().config.shift
    # Settings the fixed-shift Euler sampler cannot follow are refused, naming the key and file.
    for raw, named in (
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"shift_terminal": 0.1}, "shift_terminal"),
        ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ):
        path.write_text(json.dumps({"shift": 3.0, **raw}))
        with pytest.raises(InputError, match=named) as e:
            scheduler_settings(path)
        assert str(path) in str(e.value)
    # Dynamic-shifting parameters are inert without dynamic shifting: ignored.
    path.write_text(json.dumps({"shift": 3.0, "base_shift": 0.7, "max_image_seq_len": 1024}))
    assert scheduler_settings(path).shift == 3.0
    # A folder whose two files disagree is refused (neither silently wins).
    both = folder_with_scheduler(small_demo_teacher, tmp_path / "both", shift=2.0)
    (both / MODEL_INFO).write_text(json.dumps({**json.loads((both / MODEL_INFO).read_text()), "shift": 1.0}))
    with pytest.raises(InputError, match=f"{MODEL_INFO} says shift 1.0, {SCHEDULER_CONFIG} says 2.0"):
        model_sampler_settings(str(both))


# ------------------------------------------------------------------ DPO's time density


def dpo_steps(*sets):
    cfg = load_config(DPO_CONFIG, list(sets), command="dpo")
    return DPOSteps(cfg, engines=None, device=torch.device("cpu"))


def draw(steps, n, dtype):
    batch = {"latent_w": torch.zeros(n, 1, 1, 1, dtype=dtype), "sample_id": torch.arange(n)}
    return steps.draw_noise(batch)


def shifted_logit_normal_cdf(t: float, shift: float, mean: float, std: float) -> float:
    """P(T <= t) for T = s U / (1 + (s - 1) U), U = sigmoid(mean + std N): the shift is
    increasing, so T <= t exactly when U <= its inverse u = t / (s - (s - 1) t)."""
    u = t / (shift - (shift - 1.0) * t)
    return 0.5 * (1.0 + math.erf((math.log(u / (1.0 - u)) - mean) / (std * math.sqrt(2.0))))


def ks_distance(draws: torch.Tensor, cdf) -> float:
    """sup |F_n - F| over the sample (checked on both sides of each jump of F_n)."""
    x = draws.double().sort().values.tolist()
    n = len(x)
    return max(max((i + 1) / n - cdf(v), cdf(v) - i / n) for i, v in enumerate(x))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_times_follow_the_shifted_logit_normal(precision):
    n, alpha = 4000, 1e-6
    # Dvoretzky-Kiefer-Wolfowitz: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2) for independent draws.
    bound = math.sqrt(math.log(2.0 / alpha) / (2 * n))
    dtype = PRECISIONS[precision]
    sets = [f"deepspeed.precision={precision}", "dpo.t_mean=0.2", "dpo.t_std=0.8"]
    t3, eps3 = draw(dpo_steps(*sets, "dpo.time_shift=3"), n, dtype)
    t1, eps1 = draw(dpo_steps(*sets, "dpo.time_shift=1"), n, dtype)
    assert t3.dtype == t1.dtype == torch.float32  # times stay fp32 in bf16 runs (docs/method.md)
    assert ks_distance(t3, lambda t: shifted_logit_normal_cdf(t, 3.0, 0.2, 0.8)) < bound
    assert ks_distance(t1, lambda t: shifted_logit_normal_cdf(t, 1.0, 0.2, 0.8)) < bound
    # The test can fail: shifted times are far from the unshifted density, and the other way round.
    assert ks_distance(t3, lambda t: shifted_logit_normal_cdf(t, 1.0, 0.2, 0.8)) > 4 * bound
    assert ks_distance(t1, lambda t: shifted_logit_normal_cdf(t, 3.0, 0.2, 0.8)) > 4 * bound
    # The shift changes t only: the same noise, and shift 1 is the draw of before, to the bit.
    assert torch.equal(eps3, eps1)
    d = dpo_steps(*sets).cfg.dpo
    before = torch.sigmoid(
        d.t_mean + d.t_std * randn_per_sample(per_sample_generators(torch.arange(n), seed=0, step=0, purpose="dpo"))
    )
    assert torch.equal(t1, before)


def test_dpo_time_shift_defaults_to_the_teachers(small_demo_teacher, tmp_path):
    folder = folder_with_scheduler(small_demo_teacher, tmp_path / "teacher", shift=2.0)
    assert dpo_steps(f"model.teacher={folder}").time_shift == 2.0
    assert dpo_time_shift(load_config(DPO_CONFIG, [f"model.teacher={folder}", "dpo.time_shift=1.5"])) == 1.5
    # The demo teacher records shift 1: its DPO draws are the unshifted ones of before.
    assert dpo_steps(f"model.teacher={small_demo_teacher}").time_shift == 1.0
    assert dpo_steps().time_shift == DEFAULT_SHIFT  # the tiny preset: SD3's shift

"""model.attention_backend: torch's SDPA kernel priority around every step, in the trainer and the
step benchmark."""

import pytest
import torch
import torch.nn.functional as F

from ladd_ds.config import ConfigError, load_config
from ladd_ds.models.attention import PRIORITIES, sdpa_context, sdpa_priority
from tests.conftest import TINY_CONFIG


def attention(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).to(dtype) for _ in range(3))  # (B, heads, N, d)
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_is_torchs_choice_and_math_the_same_attention(dtype):
    plain = attention(dtype)
    with sdpa_context(sdpa_priority("default", cuda=False)):
        assert torch.equal(attention(dtype), plain)  # "default": nothing changes
    flags = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with sdpa_context(sdpa_priority("math", cuda=False)):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        math = attention(dtype)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags  # restored
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the CPU's fused kernel vs the unfused one: round-off
    torch.testing.assert_close(math.float(), plain.float(), atol=tol, rtol=tol)


def test_gpu_kernels_fall_back_on_a_cpu_and_unknown_names_are_refused():
    for name in ("flash", "cudnn", "efficient"):
        with pytest.warns(UserWarning, match=f"model.attention_backend: {name} needs a CUDA GPU"):
            assert sdpa_priority(name, cuda=False) is None
        assert sdpa_priority(name, cuda=True)[0].name.lower().startswith(name)  # put first, the others behind
        assert len(sdpa_priority(name, cuda=True)) == 4
    with pytest.raises(ValueError, match="model.attention_backend: 'xformers' is not one of"):
        sdpa_priority("xformers", cuda=True)
    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_config(TINY_CONFIG, ["model.attention_backend=xformers"])
    assert load_config(TINY_CONFIG).model.attention_backend == "default" and "default" in PRIORITIES


def test_the_trainers_step_runs_under_the_configured_backend(tmp_path, distributed_world_of_one, monkeypatch):
    from tests.test_ladd_steps import make_trainer

    trainer = make_trainer(tmp_path, "model.attention_backend=math", "checkpoint.every=100")
    seen = []
    train_step = trainer.method.train_step

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer.method, "train_step", recording)
    trainer.fit(1)
    assert seen == [False] and torch.backends.cuda.flash_sdp_enabled()  # math alone inside the step only
    trainer.close()

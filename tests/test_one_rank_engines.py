"""One rank at ZeRO-0 (what `auto` placement picks on one GPU): the engines step with a fused
AdamW and run no gradient all-reduce. bf16 steps on fp32 master weights as DeepSpeed's
FP16_UnfusedOptimizer did (the reference here is that wrapper itself); fp32 equals plain PyTorch."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

OPTIM = SimpleNamespace(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, warmup_steps=0)
LR, CLIP, STEPS, ACCUM, MICRO = 1e-2, 0.05, 3, 2, 2


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        self.unused = nn.Linear(2, 2)  # never in the graph: no gradient, steps on zeros as in DeepSpeed's wrapper

    def forward(self, x):
        return self.net(x)


def small_model() -> Small:
    torch.manual_seed(0)
    return Small()


def ds_config(precision: str) -> dict:
    from ladd_ds.distributed import engines as ds

    template = ds.load_template("ds_configs/cpu/zero0.json", "test")
    return ds.fill_ds_config(
        template, micro_batch_size=MICRO, grad_accum=ACCUM, world_size=1, precision=precision, grad_clip=CLIP
    )


def inputs(step: int, micro: int, dtype) -> torch.Tensor:
    return torch.randn(MICRO, 8, generator=torch.Generator().manual_seed(100 * step + micro)).to(dtype)


def train(engine, steps: int, dtype, *, poison_step: int | None = None) -> list[bool]:
    """`steps` optimizer steps of ACCUM micro-batches; `poison_step`'s inputs are NaN."""
    applied = []
    for step in range(steps):
        for micro in range(ACCUM):
            x = inputs(step, micro, dtype)
            if step == poison_step:
                x = x * float("nan")
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        applied.append(engine.was_step_applied())
    return applied


class CollectiveCounter:
    """Counts every all-reduce, at torch.distributed's level and at deepspeed.comm's (its CPU op)."""

    NAMES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce")

    def __init__(self, monkeypatch):
        import deepspeed.comm

        self.calls: list[str] = []
        for module in (torch.distributed, deepspeed.comm):
            for name in self.NAMES:
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, self._counting(module.__name__, name, getattr(module, name)))

    def _counting(self, where, name, original):
        def wrapper(*args, **kwargs):
            self.calls.append(f"{where}.{name}")
            return original(*args, **kwargs)

        return wrapper


def old_deepspeed_engine(model: nn.Module, config: dict):
    """The engine as built before: torch AdamW as client optimizer, DeepSpeed's bf16 handling."""
    from ladd_ds.distributed import engines as ds

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=OPTIM.betas, eps=OPTIM.eps, weight_decay=OPTIM.weight_decay)
    engine, _, _, _ = ds.deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def fp32_master_reference(steps: int, *, zero_step_first: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """Plain PyTorch: bf16 model, fp32 master weights stepped by a per-parameter AdamW, the gradient
    norm over the bf16 gradients, division by max(1, (norm + 1e-6) / clip). `zero_step_first`: one
    AdamW step on zero gradients before training, which FP16_UnfusedOptimizer takes at
    construction (initialize_optimizer_states)."""
    model = small_model().to(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    kw = dict(lr=LR, betas=OPTIM.betas, eps=OPTIM.eps, weight_decay=OPTIM.weight_decay, foreach=False)
    optimizer = torch.optim.AdamW(masters, **kw)
    if zero_step_first:
        for m in masters:
            m.grad = torch.zeros_like(m)
        optimizer.step()
    norms = []
    for step in range(steps):
        for micro in range(ACCUM):
            (model(inputs(step, micro, torch.bfloat16)).float().pow(2).mean() / ACCUM).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        norm = torch.stack([g.float().norm() for g in grads]).norm()
        for m, g in zip(masters, grads):
            m.grad = g.float() / torch.clamp((norm + 1e-6) / CLIP, min=1.0)
        optimizer.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
                p.grad = None
        norms.append(float(norm))
    return masters, norms


def assert_masters_close(got, want):
    # fp32 round-off of a fused vs a per-parameter AdamW kernel, carried through bf16 weights.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bf16_zero0_steps_on_fp32_masters_without_deepspeeds_wrapper_or_an_all_reduce(
    distributed_world_of_one, monkeypatch, tmp_path
):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from ladd_ds.distributed import engines as ds

    config = ds_config("bf16")
    new = ds.trainable_engine(small_model(), config, LR, OPTIM)
    new.optimizer.chunk_elements = 16  # every parameter its own chunk: chunking must not change the step
    old = old_deepspeed_engine(small_model(), config)
    assert isinstance(old.optimizer, FP16_UnfusedOptimizer)  # the path this replaces
    assert isinstance(new.optimizer, ds.MasterWeightAdamW) and not isinstance(new.optimizer, FP16_UnfusedOptimizer)
    assert all(p.dtype == torch.bfloat16 for p in new.module.parameters())

    counter = CollectiveCounter(monkeypatch)
    assert train(new, STEPS, torch.bfloat16) == [True] * STEPS
    assert counter.calls == []
    assert train(old, STEPS, torch.bfloat16) == [True] * STEPS
    assert counter.calls  # the counter sees DeepSpeed's one-rank all-reduce of the old path
    monkeypatch.undo()

    masters = new.optimizer.param_groups[0]["params"]
    want, norms = fp32_master_reference(STEPS)
    assert_masters_close(masters, want)
    assert float(new.get_global_grad_norm()) == pytest.approx(norms[-1], rel=1e-3) and min(norms) > CLIP  # clipped
    for p, m in zip(new.module.parameters(), masters):
        assert torch.equal(p, m.to(torch.bfloat16))  # the model holds the masters rounded to bf16
    initial = [p.to(torch.bfloat16).float() for p in small_model().parameters()]
    assert max((m - p).abs().max() for m, p in zip(masters, initial)) > 100 * 1e-5  # trained past the tolerance
    assert not torch.equal(masters[-1], initial[-1])  # `unused` got no gradient and decayed on zeros
    # The old wrapper differs by the AdamW step on zero gradients it takes when built (one weight
    # decay, and Adam's bias correction one step ahead); with that step the reference is its result.
    old_want, _ = fp32_master_reference(STEPS, zero_step_first=True)
    assert_masters_close(old.optimizer.fp32_groups[0], old_want)
    assert max((a - b).abs().max() for a, b in zip(want, old_want)) > 100 * 1e-5

    # A non-finite gradient: no update, the step reported as skipped, as DeepSpeed's wrapper does.
    before = [m.clone() for m in masters]
    assert train(new, 1, torch.bfloat16, poison_step=0) == [False]
    assert all(torch.equal(a, b) for a, b in zip(before, masters))

    # Checkpoints: DeepSpeed saves and loads the optimizer's state (FP16_UnfusedOptimizer's layout,
    # so the old wrapper's state loads too).
    new.save_checkpoint(str(tmp_path), tag="t")
    resumed = ds.trainable_engine(small_model(), config, LR, OPTIM)
    resumed.optimizer.load_state_dict(old.optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.optimizer.param_groups[0]["params"], old.optimizer.fp32_groups[0]))
    resumed.load_checkpoint(str(tmp_path), tag="t")
    train(new, 1, torch.bfloat16)
    train(resumed, 1, torch.bfloat16)
    for a, b in zip(new.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        assert torch.equal(a, b)


def test_fp32_zero0_on_one_rank_equals_plain_pytorch_without_a_gradient_all_reduce(distributed_world_of_one, monkeypatch):
    from ladd_ds.distributed import engines as ds

    config = ds_config("fp32")
    engine = ds.trainable_engine(small_model(), config, LR, OPTIM)
    assert type(engine.optimizer) is torch.optim.AdamW and not engine.enable_backward_allreduce
    reduced = []
    monkeypatch.setattr(engine, "allreduce_gradients", lambda *a, **k: reduced.append(1))
    assert train(engine, STEPS, torch.float32) == [True] * STEPS
    assert reduced == []

    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=OPTIM.betas, eps=OPTIM.eps, weight_decay=OPTIM.weight_decay)
    for step in range(STEPS):
        for micro in range(ACCUM):
            (model(inputs(step, micro, torch.float32)).pow(2).mean() / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    for a, b in zip(engine.module.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_clip_0_turns_deepspeeds_clipping_off(distributed_world_of_one):
    """DeepSpeed 0.19.8 clips at 1.0 when the key is missing: optim.grad_clip 0 must write 0."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from ladd_ds.distributed import engines as ds

    template = {**ds.load_template("ds_configs/cpu/zero0.json", "test"), "train_micro_batch_size_per_gpu": 1}
    assert DeepSpeedConfig(template).gradient_clipping > 0  # the default that a missing key means
    off = ds.fill_ds_config(template, micro_batch_size=1, grad_accum=1, world_size=1, precision="fp32", grad_clip=0)
    assert DeepSpeedConfig(off).gradient_clipping == 0
    on = ds.fill_ds_config(template, micro_batch_size=1, grad_accum=1, world_size=1, precision="fp32", grad_clip=0.5)
    assert DeepSpeedConfig(on).gradient_clipping == 0.5

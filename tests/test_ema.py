import pytest
import torch

from ladd_ds.distributed.flat import read_flat_range
from ladd_ds.training.ema import ShardedEMA


def test_ema_is_an_exponential_moving_average_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1.0))
    other = ShardedEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])


def zero3_shards(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """ZeRO-3's layout: ceil(numel / world) elements per rank, the last one zero-padded."""
    size = -(-full.numel() // world)
    flat = torch.cat([full.flatten(), full.new_zeros(size * world - full.numel())])
    return [flat[r * size : (r + 1) * size].clone() for r in range(world)]


@pytest.mark.parametrize("old_world, new_world", [(3, 2), (2, 3), (1, 4), (4, 1), (5, 5)])
def test_any_partition_is_read_from_the_shards_of_any_world_size(old_world, new_world):
    full = torch.arange(23, dtype=torch.float32)
    old = zero3_shards(full, old_world) if old_world > 1 else [full.clone()]
    for r, want in enumerate(zero3_shards(full, new_world)):
        size = want.numel()
        got = read_flat_range(old, full.numel(), r * size, min((r + 1) * size, full.numel()))
        torch.testing.assert_close(got, want[: got.numel()])
    torch.testing.assert_close(read_flat_range(old, 23, 0, 23), full)


def test_resharded_ema_from_memory_mapped_shards(tmp_path):
    """From memory-mapped files saved by 2 ZeRO-3 ranks, an EMA kept in full (below ZeRO-3, one
    rank) gets each whole tensor back."""
    model = torch.nn.Linear(5, 3)
    full = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for r in range(2):
        torch.save({"ema": {"shadow": {n: zero3_shards(t, 2)[r] for n, t in full.items()}}}, tmp_path / f"{r}.pt")
    shards = [torch.load(tmp_path / f"{r}.pt", mmap=True, weights_only=True)["ema"]["shadow"] for r in range(2)]
    ema = ShardedEMA(model, decay=0.9)
    ema.load_resharded(model, shards)
    for n, t in full.items():
        torch.testing.assert_close(ema.shadow[n], t)


def test_the_foreach_update_is_the_per_parameter_lerp_in_fp32_and_bf16():
    """One foreach call gives bit for bit what a lerp per parameter gave, for fp32 and bf16
    parameters (the EMA is fp32 either way)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3).to(torch.bfloat16))
    ema = ShardedEMA(model, decay=0.95)
    expected = {n: t.clone() for n, t in ema.shadow.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n].lerp_(p.detach().float(), 1 - 0.95)
    for n in expected:
        assert ema.shadow[n].dtype == torch.float32 and torch.equal(ema.shadow[n], expected[n]), n


def test_ema_every_k_steps(tmp_path, distributed_world_of_one):
    """optim.ema_every=2: the EMA is left alone after the first step and updated after the second."""
    from tests.test_ladd_steps import make_trainer

    trainer = make_trainer(tmp_path / "run", "optim.ema_decay=0.5", "optim.ema_every=2", "checkpoint.every=100")
    start = {n: t.clone() for n, t in trainer.method.ema.shadow.items()}
    trainer.fit(1)
    assert all(torch.equal(trainer.method.ema.shadow[n], start[n]) for n in start)
    trainer.fit(2)
    assert any(not torch.equal(trainer.method.ema.shadow[n], start[n]) for n in start)
    trainer.close()

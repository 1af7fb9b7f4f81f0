import sys
from pathlib import Path

import pytest
import torch

from ladd_ds.distributed.flat import read_flat_range
from ladd_ds.training.ema import ShardedEMA, read_ema_range
from tests.conftest import TINY_CONFIG, run_module_ranks


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
        got = read_flat_range(old, numel=full.numel(), start=r * size, stop=min((r + 1) * size, full.numel()))
        torch.testing.assert_close(got, want[: got.numel()])
    torch.testing.assert_close(read_flat_range(old, numel=23, start=0, stop=23), full)


def test_resharded_ema_from_memory_mapped_shards(tmp_path):
    """From memory-mapped files saved by 2 ZeRO-3 ranks before the EMA recorded its offsets, an
    EMA kept in full (ZeRO-0, one rank) gets each whole tensor back."""
    model = torch.nn.Linear(5, 3)
    full = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for r in range(2):
        torch.save({"ema": {"shadow": {n: zero3_shards(t, 2)[r] for n, t in full.items()}}}, tmp_path / f"{r}.pt")
    states = [torch.load(tmp_path / f"{r}.pt", mmap=True, weights_only=True)["ema"] for r in range(2)]
    ema = ShardedEMA(model, decay=0.9)
    ema.load_resharded(states)
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


def test_a_rank_keeping_part_of_the_weights_or_none_of_them():
    """ZeRO-1/2 ranges by hand: the EMA of a range is that slice of the full EMA, bit for bit, at
    its offset; a rank whose partition holds none of the weights updates nothing."""
    model = torch.nn.Linear(4, 3)
    full = ShardedEMA(model, decay=0.9)
    part = ShardedEMA(model, decay=0.9, ranges={"weight": (5, 12), "bias": (0, 0)})
    empty = ShardedEMA(model, decay=0.9, ranges={"weight": (0, 0), "bias": (0, 0)})
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
    for ema in (full, part, empty):
        ema.update(model)
    assert torch.equal(part.shadow["weight"], full.shadow["weight"].view(-1)[5:12])
    assert part.state_dict()["offset"] == {"weight": 5, "bias": 0} and part.shadow["bias"].numel() == 0
    assert sum(t.numel() for t in empty.shadow.values()) == 0


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


# ZeRO-1/2 runs of a 2-rank job (this file's `__main__` part), each (stage, precision).
ZERO12 = [(stage, precision) for stage in (1, 2) for precision in ("fp32", "bf16")]
ZERO12_DECAY = 0.8


def tiny_mlp() -> torch.nn.Module:
    """Few enough elements that 2 ZeRO-1/2 partitions cut the first weight and leave rank 0 none of
    the other parameters."""
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))


def train_with_both_emas(out: Path) -> None:
    """Each rank of test_zero12_ema_is_the_full_ema_cut_between_the_ranks: for ZeRO-1 and 2, in
    fp32 and bf16, tiny_mlp trained 3 steps by an engine of the project's CPU template, with the
    EMA of this rank's partition and the full EMA next to it. Saves both, the starting EMA, and a
    partitioned EMA loaded from the full one (a resume from 1 rank)."""
    from ladd_ds.config import load_config
    from ladd_ds.distributed import engines as ds
    from ladd_ds.training.build import engine_ds_config

    ds.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    for stage, precision in ZERO12:
        sets = [f"deepspeed.precision={precision}", "data.micro_batch_size=2", "optim.warmup_steps=0", "optim.student_lr=0.1"]
        cfg = load_config(TINY_CONFIG, sets)
        ds_config = engine_ds_config(cfg, 2, "student_config", True, stage=stage)
        torch.manual_seed(0)
        engine = ds.trainable_engine(tiny_mlp(), ds_config, cfg.optim.student_lr, cfg.optim)
        ranges = ds.partition_ranges(engine)
        sharded = ShardedEMA(engine.module, ZERO12_DECAY, ranges=ranges)
        full = ShardedEMA(engine.module, ZERO12_DECAY)
        start = {n: t.clone() for n, t in full.shadow.items()}
        torch.manual_seed(1 + rank)  # each rank its own batches
        for _ in range(3):
            x = torch.randn(2, 7, dtype=next(engine.module.parameters()).dtype)
            engine.backward(engine(x).square().mean())
            engine.step()
            sharded.update(engine.module)
            full.update(engine.module)
        loaded = ShardedEMA(engine.module, ZERO12_DECAY, ranges=ranges)
        loaded.load_resharded([full.state_dict()])
        state = {"sharded": sharded.state_dict(), "full": full.state_dict(), "start": start, "loaded": loaded.state_dict()}
        torch.save(state, out / f"zero{stage}_{precision}_rank{rank}.pt")


@pytest.mark.multiproc
def test_zero12_ema_is_the_full_ema_cut_between_the_ranks(tmp_path):
    """2 ranks at ZeRO-1 and ZeRO-2, fp32 and bf16: each rank keeps the EMA of its optimizer
    partition only, and the ranks' pieces joined are bit for bit the full EMA of the same weights;
    loaded on 1 rank (from the memory-mapped pieces) they are the full EMA, and a rank's piece
    loaded from the full EMA is its own."""
    run_module_ranks("tests.test_ema", str(tmp_path), nproc=2)
    numel = {n: p.numel() for n, p in tiny_mlp().named_parameters()}
    # DeepSpeed pads the flat group to a multiple of 2 elements per rank (stage_1_and_2.py).
    partition = -(-sum(numel.values()) // 4) * 4 // 2
    for stage, precision in ZERO12:
        states = [torch.load(tmp_path / f"zero{stage}_{precision}_rank{r}.pt", mmap=True, weights_only=True) for r in range(2)]
        full, pieces = states[0]["full"]["shadow"], [s["sharded"] for s in states]
        what = f"ZeRO-{stage} {precision}"
        for n in numel:
            assert torch.equal(states[1]["full"]["shadow"][n], full[n]), (what, n)  # the same weights on both ranks
            assert not torch.equal(full[n], states[0]["start"][n]), (what, n)  # training moved the EMA
            joined = read_ema_range(pieces, n, numel=numel[n], start=0, stop=numel[n])
            assert torch.equal(joined.view_as(full[n]), full[n]), (what, n)
            for s in states:
                assert torch.equal(s["loaded"]["shadow"][n], s["sharded"]["shadow"][n]), (what, n)
        sizes = [sum(t.numel() for t in p["shadow"].values()) for p in pieces]
        assert sum(sizes) == sum(numel.values()) and max(sizes) <= partition, (what, sizes)
        assert any(0 < p["offset"][n] < numel[n] for p in pieces for n in numel), what  # a parameter cut in two
        assert any(p["shadow"][n].numel() == 0 for p in pieces for n in numel), what  # a rank holding none of one
        one_rank = ShardedEMA(tiny_mlp(), ZERO12_DECAY)  # ZeRO-0: the whole tensors
        one_rank.load_resharded(pieces)
        assert all(torch.equal(one_rank.shadow[n], full[n]) for n in numel), what


if __name__ == "__main__":  # a rank of test_zero12_ema_is_the_full_ema_cut_between_the_ranks
    train_with_both_emas(Path(sys.argv[1]))

"""The communication plan (ladd_ds/training/comms_plan.py) against DeepSpeed's comms logger on
CPU ranks, its arithmetic, `auto` picking the fastest placement, and the scaling table of
docs/performance.md."""

import json
import math
import re

import pytest
import torch

from ladd_ds.config import load_config
from ladd_ds.core.errors import InputError
from ladd_ds.ladd.build import build_ds_configs, build_models, ladd_comms_plan, ladd_layouts, place_ladd_engines
from ladd_ds.training import comms_plan, zero3_replay
from ladd_ds.training.placement import GIB, EngineNeeds, choose_placement
from tests.conftest import REPO, TINY_CONFIG, _run_ranks, cli_error

# The tiny model's parameters are all under DeepSpeed's default persistence threshold (1e5
# elements), which would keep them gathered; threshold 0 makes ZeRO-3 gather them module by module.
NOT_PERSISTENT = {"stage3_param_persistence_threshold": 0}


def _template(tmp_path, name: str, source: str, **zero) -> str:
    t = json.loads((REPO / source).read_text())
    t["zero_optimization"].update(zero)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(t))
    return str(path)


def _planned(sets: list[str], world: int) -> comms_plan.CommsPlan:
    cfg = load_config(TINY_CONFIG, sets)
    configs = build_ds_configs(cfg, world)
    teacher, student, heads, _ = build_models(cfg, device="meta")
    models = {"teacher": teacher, "student": student, "heads": heads}
    return ladd_comms_plan(cfg, world, configs, ladd_layouts(cfg, configs, models))


def _cases(tmp_path):
    """(ranks, --set overrides): 2 fp32 ranks with the CPU ZeRO-3 template for all three engines
    (DeepSpeed's default prefetch and reuse distance); 4 bf16 ranks with the GPU templates (fp32
    reduction; ZeRO-2 heads), gradient checkpointing, no reuse distance and hpZ groups of 2."""
    cpu3 = _template(tmp_path, "cpu3", "ds_configs/cpu/zero3.json", **NOT_PERSISTENT)
    cpu3_frozen = _template(tmp_path, "cpu3_frozen", "ds_configs/cpu/zero3_frozen.json", **NOT_PERSISTENT)
    gpu3 = _template(
        tmp_path,
        "gpu3",
        "ds_configs/gpu/sd3_large.json",
        stage3_max_reuse_distance=0,
        zero_hpz_partition_size=2,
        **NOT_PERSISTENT,
    )
    return {
        "2 ranks fp32": (
            2,
            [
                f"deepspeed.student_config={cpu3}",
                f"deepspeed.teacher_config={cpu3_frozen}",
                # The heads at ZeRO-3 with the default persistence threshold: their trace never
                # completes, so their persistent parameters are released and gathered again.
                "deepspeed.heads_config=ds_configs/cpu/zero3.json",
            ],
        ),
        "4 ranks bf16 hpZ": (
            4,
            [
                "deepspeed.precision=bf16",
                "model.gradient_checkpointing=true",
                "data.micro_batch_size=1",
                f"deepspeed.student_config={gpu3}",
                f"deepspeed.teacher_config={gpu3}",
                "deepspeed.teacher_stage=3",
                "deepspeed.heads_config=ds_configs/gpu/heads.json",
            ],
        ),
    }


@pytest.mark.parametrize("case", ["2 ranks fp32", "4 ranks bf16 hpZ"])
def test_plan_matches_the_comms_logger(tmp_path, case):
    """Per engine and collective (and, for hpZ, per group), the bytes of one steady-state step
    that DeepSpeed's comms logger records (evaluation/comms_probe.py) are the plan's, within 2%;
    the gradient norm's scalar all-reduce within a few bytes. The hpZ secondary weight shards each
    engine holds at most are the memory plan's term, to the element."""
    nproc, sets = _cases(tmp_path)[case]
    out = tmp_path / "measured.json"
    args = ["--config", str(TINY_CONFIG), "--warmup", "2", "--steps", "1", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    _run_ranks(tuple(args), nproc, timeout=600, check=True, module="evaluation.comms_probe")
    probe = json.loads(out.read_text())
    measured = probe["engines"]
    plan = _planned(sets, nproc)
    # The memory plan's hpZ term: the most secondary weight-shard elements each engine held on rank 0.
    memory = place_ladd_engines(load_config(TINY_CONFIG, sets), nproc, plan_always=True)[1].memory
    assert probe["hpz_secondary_elements"] == {name: memory[name].hpz_secondary for name in probe["hpz_secondary_elements"]}
    for engine, collectives in plan.engines.items():
        got: dict[tuple[str, int], float] = {}
        # A trace that does not complete (the heads' at ZeRO-3) is checked across ranks at every
        # top-level forward with a few small broadcasts (zero/utils.py assert_ints_same_as_other_ranks).
        checks = measured.get(engine, {}).pop("broadcast", {"bytes": 0})["bytes"]
        assert checks < 0.01 * sum(v["bytes"] for v in measured.get(engine, {}).values()) + 1
        for op, v in measured.get(engine, {}).items():
            name, _, group = op.partition("@")
            assert name in comms_plan.DS_OPS, f"{engine}: {op} is not in the plan ({v})"
            key = (comms_plan.DS_OPS[name], int(group or nproc))
            got[key] = got.get(key, 0.0) + v["bytes"]
        for name, c in collectives.items():
            expected = {(name, nproc): c.logged - c.logged_in_groups}
            if c.logged_in_groups:
                expected[(name, c.group)] = c.logged_in_groups
            for key, planned in expected.items():
                value = got.pop(key, 0.0)
                tolerance = max(0.02 * planned, 8)  # 8 bytes: the norm's and overflow check's scalars
                assert abs(value - planned) <= tolerance, f"{case}, {engine} {key}: logged {value} B, planned {planned} B"
        assert not got, f"{case}, {engine}: logged but not planned: {got}"
    # The runs exercise what they are for: module-wise gathers of the frozen teacher, and hpZ.
    assert plan.engines["teacher"]["all_gather"].logged > 0
    hpz = any(c["all_gather"].logged_in_groups > 0 for c in plan.engines.values())
    assert hpz == (case == "4 ranks bf16 hpZ")


def _gathered(layout, events: str, **kwargs) -> tuple[float, float]:
    replayed = zero3_replay.replay(layout, events, **kwargs)
    return replayed.gathered, replayed.within


def _toy_layout(persistence: float = 0.0) -> zero3_replay.EngineLayout:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        x = torch.randn(2, 8)
    layout, _ = zero3_replay.trace_model(model, lambda m: m(x), persistence_threshold=persistence)
    return layout


def test_zero3_gathers_every_use_without_prefetch_or_reuse():
    """No prefetch and no reuse distance: every forward and backward use gathers its module's
    shard (ceil(numel / world) per parameter); the step releases all and gathers the persistent
    parameters (here the biases) again."""
    world = 3
    layout = _toy_layout(persistence=16)  # biases (16, 16, 4 elements) persistent, weights not
    weights = sum(math.ceil(n / world) for n in (8 * 16, 16 * 16, 16 * 4))
    biases = sum(math.ceil(n / world) for n in (16, 16, 4))
    zero = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}
    assert _gathered(layout, "RFBS", world=world, zero=zero) == (2 * weights + biases, 0.0)
    # A frozen engine's forward only: once per forward.
    assert _gathered(layout, "RFRF", world=world, zero=zero) == (2 * weights, 0.0)
    # A reuse distance over the whole model keeps the parameters from the forward to the backward.
    assert _gathered(layout, "RFBS", world=world, zero={**zero, "stage3_max_reuse_distance": 1e9}) == (
        weights + biases,
        0.0,
    )
    # hpZ in groups of 3 of 6 ranks: the backward reads the secondary shards (1/3 of the padded tensor).
    secondary = sum(math.ceil(n / 6) * 6 / 3 for n in (8 * 16, 16 * 16, 16 * 4))
    primary = sum(math.ceil(n / 6) for n in (8 * 16, 16 * 16, 16 * 4)) + sum(math.ceil(n / 6) for n in (16, 16, 4))
    hpz = {**zero, "zero_hpz_partition_size": 3}
    assert _gathered(layout, "RFBS", world=6, zero=hpz) == (primary, secondary)


def test_shipped_hpz_template_is_sd3_large_with_node_groups():
    """ds_configs/gpu/sd3_large_hpz.json (docs/performance.md, "hpZ") stays sd3_large.json with
    hpZ groups of 8 GPUs, a node of the scaling table."""
    plain = json.loads((REPO / "ds_configs/gpu/sd3_large.json").read_text())
    hpz = json.loads((REPO / "ds_configs/gpu/sd3_large_hpz.json").read_text())
    assert hpz["zero_optimization"].pop("zero_hpz_partition_size") == 8
    assert hpz == plain


def test_ring_wire_bytes_and_times():
    """Wire bytes per rank: all-reduce 2 (n-1)/n of the buffer, ZeRO-3's reduce-scatter (n-1)/n,
    all-gather (n-1) shards; a group within a node runs at the intra-node bandwidth."""
    layout = _toy_layout()
    n_t = sum(layout.trained_numels)
    net = comms_plan.Interconnect.parse("800,80,2")
    for stage, world in ((2, 4), (3, 2)):
        step = comms_plan.EngineStep("m", layout, stage, {"communication_data_type": "fp32"}, "RFBS", 1, 1e9)
        coll = comms_plan.engine_bytes(step, world=world, precision="bf16")
        comms_plan.engine_times(step, coll, world=world, precision="bf16", net=net, tflops=1)
        if stage == 2:
            assert coll["all_reduce"].wire == pytest.approx(n_t * 4 * 2 * 3 / 4 + 4 * 2 * 3 / 4)
            assert coll["all_reduce"].seconds == pytest.approx(coll["all_reduce"].wire / 10e9)  # 80 Gb/s
            assert coll["all_gather"].exposed == coll["all_gather"].seconds > 0  # after the step
        else:
            padded = sum(2 * math.ceil(n / 2) for n in layout.trained_numels)
            assert coll["reduce_scatter"].wire == pytest.approx(padded * 4 / 2)
            assert coll["reduce_scatter"].seconds == pytest.approx(coll["reduce_scatter"].wire / 100e9)  # 800 Gb/s
    with pytest.raises(InputError, match="--interconnect"):
        comms_plan.Interconnect.parse("3600,400")


def test_auto_picks_the_fastest_placement_that_fits():
    """Without a step time `auto` takes the first stage that fits (ZeRO-2, replicated teacher);
    with one, the fastest assignment that fits, and a faster one that does not fit is passed over."""
    with torch.device("meta"):
        student, teacher = torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1000).requires_grad_(False)
    engines = [EngineNeeds("student", student, True, "auto", {}), EngineNeeds("teacher", teacher, False, "auto", {})]
    kwargs = dict(world=4, precision="bf16", grad_accum=1, activations=0.0, device_bytes=GIB)
    assert choose_placement(engines, **kwargs).stages == {"student": 2, "teacher": 0}
    seconds = {(3, 0): 1.0, (2, 0): 2.0, (3, 3): 3.0, (2, 3): 4.0}
    picked = choose_placement(engines, **kwargs, step_time=lambda s: seconds[(s["student"], s["teacher"])])
    assert picked.stages == {"student": 3, "teacher": 0} and "fastest" in picked.reasons["student"]
    # Memory for ZeRO-3 students only (their 16 B/param fully sharded), where 2 is faster.
    small = dict(kwargs, device_bytes=6e6 / 0.9 * 1.2)
    faster_2 = {(2, 0): 1.0, (2, 3): 1.5, (3, 0): 2.0, (3, 3): 3.0}
    assert choose_placement(engines, **small, step_time=lambda s: faster_2[(s["student"], s["teacher"])]).stages["student"] == 3


def test_dry_run_times_communication(capsys):
    from ladd_ds.cli import main

    assert main(["train", "--config", str(TINY_CONFIG), "--dry-run", "--world-size", "16", "--interconnect", "800,100,4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"student\s+3\s+all_gather", out) and "scaling efficiency" in out
    assert "Interconnect" not in cli_error(capsys, "train", "--config", str(TINY_CONFIG), "--dry-run", "--interconnect", "x")


def test_docs_scaling_table_is_the_scripts():
    """docs/performance.md's table is what evaluation/scaling_table.py prints."""
    from evaluation.scaling_table import rows

    docs = (REPO / "docs" / "performance.md").read_text()
    assert "\n".join(rows()) in docs

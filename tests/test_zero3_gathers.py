"""ZeRO-3's parameter gathers: how often a step would drain the GPU (DeepSpeed's CUDA stream path,
modelled on CPU ranks by tests/device_syncs.py), transformer blocks as leaf modules
(deepspeed.z3_leaf_blocks), and the "auto" gather sizes of the templates."""

import json
import os

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from torch.utils._python_dispatch import TorchDispatchMode

import tests.conftest as conftest
from ladd_ds.config import load_config
from ladd_ds.data.loader import batch_to_device
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.zero_sizes import block_params, zero3_live_sizes
from ladd_ds.ladd.build import build_models, place_ladd_engines
from ladd_ds.training.placement import EngineNeeds, _largest_module_params, zero3_gather_unit, zero3_live_params
from tests import device_syncs
from tests.conftest import EXACT, REPO, TINY_CONFIG, read_metrics, train_tiny
from tests.test_ladd_steps import local_params, make_trainer

LIVE = (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT)  # gathered, or being gathered


def gathered_templates(tmp_path, **zero) -> list[str]:
    """--set overrides: the committed CPU ZeRO-3 templates (student, teacher) with every parameter
    gathered (the tiny model's are all below the persistence threshold, which keeps them resident)
    and the `zero` settings."""
    sets = []
    for key, name in (("student_config", "zero3"), ("teacher_config", "zero3_frozen")):
        template = json.loads((REPO / "ds_configs" / "cpu" / f"{name}.json").read_text())
        template["zero_optimization"].update({"stage3_param_persistence_threshold": 0, **zero})
        (tmp_path / f"{name}.json").write_text(json.dumps(template))
        sets.append(f"deepspeed.{key}={tmp_path / f'{name}.json'}")
    return sets


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero3_steps_do_not_drain_the_device_and_leaf_blocks_train_the_same(tmp_path, monkeypatch):
    """2 ZeRO-3 ranks (student and teacher), every parameter gathered, the distillation loss on,
    3 steps (the first records the prefetch trace; DeepSpeed's throughput timer synchronizes from
    the third), on the stream path DeepSpeed takes on a GPU. With the committed templates (overlap_comm: a gather's wait is on the
    all-gather stream; DeepSpeed's throughput timer off) no step makes the host wait on the compute
    stream or the device; with `overlap_comm: false` every gathered module's wait did
    (docs/performance.md, "ZeRO-3 gathers"). Transformer blocks as leaf modules gather less often
    and train exactly as per-submodule gathers do (fp32). (How often each gathers:
    test_leaf_blocks_train_as_per_submodule_gathers_in_bf16.)"""
    site = device_syncs.sitecustomize_dir(tmp_path / "site")
    plain_env = conftest.subprocess_env

    def counting_env():
        env = plain_env()
        env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
        env[device_syncs.ENV] = str(tmp_path / f"syncs-{len(runs)}")
        return env

    monkeypatch.setattr(conftest, "subprocess_env", counting_env)
    sets = [*EXACT, "ladd.distill_weight=0.5", *gathered_templates(tmp_path)]
    runs = {}
    for name, extra in (("per-submodule", []), ("leaf blocks", ["deepspeed.z3_leaf_blocks=true"])):
        prefix = tmp_path / f"syncs-{len(runs)}"
        train_tiny(tmp_path / name, 3, [*sets, *extra], nproc=2)
        runs[name] = [json.loads(prefix.with_name(f"{prefix.name}.{rank}.json").read_text()) for rank in range(2)]
    for name, ranks in runs.items():
        for steps in ranks:
            assert len(steps) == 3
            assert [device_syncs.drains(c) for c in steps] == [0, 0, 0], (name, steps)
            assert all(c.get("host waits on side stream", 0) > 0 for c in steps)  # it did gather
    plain, leaf = read_metrics(tmp_path / "per-submodule"), read_metrics(tmp_path / "leaf blocks")
    for key in ("loss/generator", "loss/distill", "loss/discriminator"):
        assert [r[key] for r in leaf] == pytest.approx([r[key] for r in plain], rel=1e-6, abs=1e-7), key


def test_leaf_blocks_train_as_per_submodule_gathers_in_bf16(tmp_path, distributed_world_of_one, monkeypatch):
    """One rank, bf16: a G and a D step with the blocks as ZeRO-3 leaf modules give the losses and
    the student update of per-submodule gathers (the same kernels on the same values), with fewer
    all-gather calls: on this first step DeepSpeed records its trace and does not prefetch, so
    every use of a module that is not gathered starts one (one per block instead of one per
    submodule with weights)."""
    coordinator = PartitionedParameterCoordinator
    gather = coordinator._PartitionedParameterCoordinator__all_gather_params_
    calls = []

    def counted(self, params, forward, quantize=False):
        calls.append(1)
        return gather(self, params, forward, quantize)

    monkeypatch.setattr(coordinator, "_PartitionedParameterCoordinator__all_gather_params_", counted)
    sets = gathered_templates(tmp_path)
    results, gathers = [], []
    for leaf in (False, True):
        trainer = make_trainer(
            tmp_path / str(leaf), *sets, "deepspeed.precision=bf16", "ladd.distill_weight=0.5", f"deepspeed.z3_leaf_blocks={leaf}"
        )
        method = trainer.method
        batch = method.to_device(next(trainer.batches))
        noise = method.draw_noise(batch)
        metrics, fakes = method.generator_step(batch, noise)
        metrics.update(method.discriminator_step(batch, noise, fakes))
        results.append(({k: float(v) for k, v in metrics.items()}, local_params(method.engines.student.module)))
        gathers.append(len(calls))
        calls.clear()
        trainer.close()
    (m_plain, student_plain), (m_leaf, student_leaf) = results
    assert 0 < gathers[1] < gathers[0] / 2, gathers
    assert m_leaf == m_plain
    assert all(torch.equal(student_leaf[n], student_plain[n]) for n in student_plain)


def test_auto_gather_sizes_are_two_blocks_in_the_configs_and_the_plan(tmp_path):
    """`"auto"` stage3_prefetch_bucket_size / stage3_max_live_parameters: one and two of the
    model's largest blocks, in the resolved DeepSpeed config written into the run directory and in
    the memory plan's ZeRO-3 live term; a stage below 3 drops them."""
    template = json.loads((REPO / "ds_configs" / "cpu" / "zero3.json").read_text())
    auto = {"stage3_prefetch_bucket_size": "auto", "stage3_max_live_parameters": "auto"}
    template["zero_optimization"].update(stage3_param_persistence_threshold=0, **auto)  # the live term alone
    (tmp_path / "auto.json").write_text(json.dumps(template))
    sets = [f"deepspeed.student_config={tmp_path / 'auto.json'}", f"deepspeed.teacher_config={tmp_path / 'auto.json'}"]
    run_dir = tmp_path / "run"
    train_tiny(run_dir, 1, [*sets, "logging.progress_bar=false"], launcher="in-process")
    cfg = load_config(TINY_CONFIG, sets)
    teacher, student, _, _ = build_models(cfg, device="meta")
    block = sum(p.numel() for p in teacher.blocks[0].parameters())
    assert block_params(teacher) == block > _largest_module_params(teacher)
    assert zero3_live_sizes(student) == {"stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 2 * block}
    for name in ("student", "teacher"):
        zero = json.loads((run_dir / f"ds_config_{name}.json").read_text())["zero_optimization"]
        assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"]) == (block, 2 * block)
    # The plan's ZeRO-3 buffers of the frozen teacher (2 ranks, fp32: 4 bytes) are its live term
    # alone, replayed with the same two numbers: as with them written into the template.
    placement = place_ladd_engines(cfg, 2, plan_always=True)[1]
    assert placement.stages["teacher"] == 3
    template["zero_optimization"].update(stage3_prefetch_bucket_size=block, stage3_max_live_parameters=2 * block)
    (tmp_path / "explicit.json").write_text(json.dumps(template))
    explicit = [
        f"deepspeed.student_config={tmp_path / 'explicit.json'}",
        f"deepspeed.teacher_config={tmp_path / 'explicit.json'}",
    ]
    written = place_ladd_engines(load_config(TINY_CONFIG, explicit), 2, plan_always=True)[1]
    live = placement.memory["teacher"].zero3_live
    assert live == written.memory["teacher"].zero3_live and placement.memory["teacher"].buffers == live * 4
    below = place_ladd_engines(load_config(TINY_CONFIG, [*sets, "deepspeed.student_stage=2"]), 2)[0]["student"]
    assert "stage3_max_live_parameters" not in below["zero_optimization"]


class LiveGathered(TorchDispatchMode):
    """The oracle of ZeRO-3's live window: before every op of a step (forwards, backwards, the
    optimizer step) the elements of each model's non-persistent parameters that DeepSpeed holds
    gathered or is gathering (`ds_status`); `peak` is the largest per model."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.params = {name: [p for p in m.parameters() if not p.ds_persist] for name, m in models.items()}
        self.peak = dict.fromkeys(models, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for name, params in self.params.items():
            live = sum(p.ds_numel for p in params if p.ds_status in LIVE)
            self.peak[name] = max(self.peak[name], live)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def live_windows(tmp_path_factory, distributed_world_of_one) -> dict:
    """One rank (DeepSpeed still partitions and gathers there: a parameter is NOT_AVAILABLE
    between uses), ZeRO-3 student and teacher with every parameter gathered and "auto" gather
    sizes, 2 LADD steps per-submodule in fp32 and with leaf blocks in bf16 (elements do not
    depend on the dtype; the plan's bytes do). Per case: the measured peak of each step per model,
    and the plan's engines (EngineNeeds as place_engines makes them) and placement."""
    tmp = tmp_path_factory.mktemp("live")
    sets = gathered_templates(tmp, stage3_prefetch_bucket_size="auto", stage3_max_live_parameters="auto")
    cases = {}
    for leaf, precision in ((False, "fp32"), (True, "bf16")):
        overrides = [*sets, f"deepspeed.precision={precision}", f"deepspeed.z3_leaf_blocks={leaf}"]
        trainer = make_trainer(tmp / str(leaf), *overrides)
        e = trainer.method.engines
        models = {"student": e.student.module, "teacher": e.teacher.module}
        steps = []
        for step in range(2):  # the first records DeepSpeed's trace, the second runs on it
            batch = batch_to_device(next(trainer.batches), ds.device(), trainer.dtype)
            with LiveGathered(models) as live:
                trainer.method.train_step([batch], step)
            steps.append(live.peak)
        configs = e.ds_configs
        trainer.close()
        cfg = load_config(TINY_CONFIG, overrides)
        teacher, student, _, _ = build_models(cfg, device="meta")
        needs = {
            name: EngineNeeds(name, model, name == "student", 3, configs[name], leaf_blocks=leaf)
            for name, model in (("student", student), ("teacher", teacher))
        }
        placement = place_ladd_engines(cfg, 1, plan_always=True)[1]
        cases[leaf] = {"steps": steps, "needs": needs, "placement": placement, "precision": precision}
    return cases


def test_the_plans_zero3_gather_unit_is_what_deepspeed_gathers_at_once(live_windows):
    """The plan's live term counts the largest unit ZeRO-3 gathers at once: with leaf blocks
    (deepspeed.z3_leaf_blocks) a whole block, else the largest module's own parameters: the
    window is at least that. Over the student's first step DeepSpeed records its trace (no
    prefetch; each module is released after its use), so its window is the unit plus the input
    layers, whose release waits for the end of the backward: below a block without leaf blocks
    (the teacher's trace is complete from the step's second forward on). The plan's ZeRO-3
    buffers of the frozen teacher (nothing persistent) are its live term in the run's dtype, at
    least the prefetch bucket plus the unit."""
    for leaf, case in live_windows.items():
        placement = case["placement"]
        for name, needs in case["needs"].items():
            block = block_params(needs.model)
            unit = zero3_gather_unit(needs)
            assert unit == (block if leaf else _largest_module_params(needs.model))
            first = case["steps"][0][name]
            assert first >= unit, (leaf, name, case["steps"])
            if name == "student" and not leaf:
                assert first < block, case["steps"]
            assert placement.stages[name] == 3
        teacher = case["needs"]["teacher"]
        weight_b = 2 if case["precision"] == "bf16" else 4
        live = placement.memory["teacher"].zero3_live
        assert placement.memory["teacher"].buffers == live * weight_b
        assert live >= zero3_live_params(teacher, teacher.ds_config)  # the replay against the lower estimate


# One size up from the tiny model: 6 blocks, so that a window of two blocks is not the whole model.
SMALL = [
    "model.teacher=small",
    "data.random_latents.latent_channels=16",
    "data.random_latents.text_dim=256",
    "data.random_latents.pooled_dim=64",
    "data.micro_batch_size=1",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        # DeepSpeed's default reuse distance (1e9, as the GPU templates): a forward keeps what the backward uses again.
        ("fp32", "per-submodule, default reuse distance", {}, []),
        ("bf16", "leaf blocks, no reuse distance", {"stage3_max_reuse_distance": 0}, ["deepspeed.z3_leaf_blocks=true"]),
        ("bf16", "checkpointing, no reuse distance", {"stage3_max_reuse_distance": 0}, ["model.gradient_checkpointing=true"]),
    ],
    ids=lambda c: f"{c[0]}, {c[1]}",
)
def test_the_plans_zero3_live_term_is_what_deepspeed_keeps_gathered(tmp_path, distributed_world_of_one, case):
    """One rank, the small model, ZeRO-3 student and teacher with every parameter gathered and
    "auto" gather sizes: the most elements of parameters DeepSpeed holds gathered (or is
    gathering) in each of 2 steps, once its trace is recorded, is the memory plan's ZeRO-3 live
    term, which replays the step (training/zero3_replay.py), to the element: prefetch, reuse
    distance, modules whose inputs need no gradient held to the backward's end, the frozen
    teacher emptied at the step's end (engines.release_frozen). Without a reuse distance the
    window is about two blocks; DeepSpeed's default keeps the whole student gathered."""
    precision, _, zero, extra = case
    sets = [
        *gathered_templates(tmp_path, stage3_prefetch_bucket_size="auto", stage3_max_live_parameters="auto", **zero),
        *SMALL,
        f"deepspeed.precision={precision}",
        *extra,
    ]
    trainer = make_trainer(tmp_path / "run", *sets)
    e = trainer.method.engines
    models = {"student": e.student.module, "teacher": e.teacher.module}
    measured = []
    for step in range(3):  # the first records DeepSpeed's trace, the next two run on it
        batch = batch_to_device(next(trainer.batches), ds.device(), trainer.dtype)
        with LiveGathered(models) as live:
            trainer.method.train_step([batch], step)
        measured.append(live.peak)
    trainer.close()
    placement = place_ladd_engines(load_config(TINY_CONFIG, sets), 1, plan_always=True)[1]
    planned = {name: placement.memory[name].zero3_live for name in models}
    assert measured[1] == measured[2] == planned, (measured, planned)
    block = block_params(models["student"])
    whole = sum(p.ds_numel for p in models["student"].parameters())
    if zero:  # without reuse: about two blocks, the one computing and the one prefetched
        assert all(2 * block <= planned[name] < 3 * block for name in planned), planned
    else:
        assert planned["student"] == whole, planned

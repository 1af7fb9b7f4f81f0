"""Validation during training (eval.every; ladd_ds.ladd.validation): the student's FD against
held-out teacher samples, every rank its share. A run on 2 ZeRO-3 ranks logs the numbers one
process logs (the blocks are padded so both ranks run the same forwards) and trains what a run
without validation trains; bf16 runs; a bad eval section is refused before any model is built;
the dry run's cost is the FLOPs a validation runs."""

import math

import pytest

from tests.conftest import EXACT, GLOBAL_BATCH_8, cli_error, read_metrics, train_tiny
from tests.metric_nets import dinov2_folder
from tests.test_data_checks import write_root

# Two buckets of 6 held-out samples; 5 read from each: 2 ranks hold blocks of 2 and 3 samples.
HELD_OUT = {"128x128": 6, "64x128": 6}
EVAL = ["eval.every=1", "eval.num_samples=5", "eval.batch_size=2", "eval.images=3"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("held_out") / "data", HELD_OUT)


def validation_records(run_dir) -> dict[int, dict]:
    """step -> the validation record of metrics.jsonl (the one with val/ keys)."""
    return {r["step"]: r for r in read_metrics(run_dir) if any(k.startswith("val/") for k in r)}


def fd_keys(record: dict) -> list[str]:
    return sorted(k for k in record if k.startswith("val/fd_"))


def test_validation_on_two_ranks_equals_one(tmp_path, held_out, reference_runs):
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"{nproc}rank"
        train_tiny(run_dir, 2, [*EXACT, *GLOBAL_BATCH_8[nproc], *EVAL, f"eval.data={held_out}"], nproc=nproc)
        runs[nproc] = validation_records(run_dir)
        # Validating changes nothing in training: the losses of the same run without it.
        trained = [r for r in read_metrics(run_dir) if "loss/generator" in r]
        without = [r for r in read_metrics(reference_runs(nproc)) if "loss/generator" in r][:2]
        for key in ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit"):
            assert [r[key] for r in trained] == [r[key] for r in without], (nproc, key)
    assert sorted(runs[1]) == [0, 1, 2]  # before the first step, every eval.every steps and at the last step
    expected = [f"val/fd_tokens/{n}step{b}" for n in (1, 2, 4) for b in ("", *(f"/{name}" for name in sorted(HELD_OUT)))]
    assert fd_keys(runs[1][1]) == sorted(expected)
    for step in (0, 1, 2):
        one, two = runs[1][step], runs[2][step]
        assert fd_keys(two) == fd_keys(one)
        for key in fd_keys(one):
            assert one[key] > 0 and two[key] == pytest.approx(one[key], rel=1e-4), (step, key)
        assert ("val/time_share" in two) == (step > 0) and 0 < two.get("val/time_share", 0.5) < 1
    # The student changed between the two validations; the reference (the stored samples) did not.
    assert runs[1][1]["val/fd_tokens/1step"] != runs[1][2]["val/fd_tokens/1step"]
    events = b"".join(p.read_bytes() for p in (tmp_path / "2rank" / "tb").rglob("events.out.tfevents.*"))
    for tag in ("val/1step/128x128", "val/4step/64x128", "val/fd_tokens/2step/64x128"):
        assert tag.encode() in events, tag


def test_validation_in_bf16(tmp_path, held_out):
    run_dir = tmp_path / "bf16"
    proc = train_tiny(
        run_dir, 1, [*EXACT, *GLOBAL_BATCH_8[2], *EVAL, f"eval.data={held_out}", "deepspeed.precision=bf16"], nproc=2
    )
    record = validation_records(run_dir)[1]
    assert len(fd_keys(record)) == 9 and all(math.isfinite(record[k]) and record[k] > 0 for k in fd_keys(record))
    assert "validation fd_tokens/1step" in proc.stdout


@pytest.mark.parametrize(
    "sets, message",
    [
        (["eval.data=/nonexistent/held_out"], "eval.data /nonexistent/held_out does not exist"),
        (["eval.steps=[3]"], "eval.steps: --steps 3: the student was trained on"),
        (["data.source=mds", "data.path={held_out}"], "eval.data is data.path"),
        (["eval.num_samples=1"], "eval.num_samples: an FD needs at least 2"),
    ],
)
def test_bad_eval_section_is_refused(tmp_path, capsys, held_out, sets, message):
    sets = [s.format(held_out=held_out) for s in sets]
    if not any(s.startswith("eval.data=") for s in sets):
        sets.append(f"eval.data={held_out}")
    args = ["train", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]
    for s in sets:
        args += ["--set", s]
    err = cli_error(capsys, *args)
    assert message in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))


def test_dpo_refuses_an_eval_section(tmp_path, capsys, held_out):
    from tests.test_data_checks import DPO_CONFIG

    err = cli_error(
        capsys, "dpo", "--config", str(DPO_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"eval.data={held_out}"
    )
    assert "eval.data: validation during training is LADD's" in err


def test_planned_validation_flops_are_the_counted_ones(tmp_path, distributed_world_of_one, held_out):
    """The dry run's validation cost, term by term, against the FLOPs the validation and a training
    step run (torch's FLOP formulas on the real tensors, attributed to the model that ran them; the
    decode and the image encoder of eval.features run outside the models and are not counted)."""
    from ladd_ds.ladd import validation
    from ladd_ds.ladd.build import as_engines_hold, build_models, step_activations
    from ladd_ds.models.activations import RecomputeFlops
    from tests.test_ladd_steps import make_trainer

    encoder = dinov2_folder(tmp_path / "dinov2")  # eval.features: FD of the decoded images too
    trainer = make_trainer(
        tmp_path / "run", f"eval.data={held_out}", "eval.num_samples=5", "eval.batch_size=2", f"eval.features={encoder}",
        "checkpoint.every=100",
    )  # fmt: skip
    cfg, method = trainer.cfg, trainer.method
    teacher, student, heads, taps = build_models(cfg, device="meta")
    models = {"teacher": teacher, "student": student, "heads": heads}
    as_engines_hold(cfg, models)
    cost = validation.validation_cost(cfg, models, taps, validation.held_out_shapes(cfg), world=1)

    class ByModel(RecomputeFlops):
        """FLOPs by the model whose forward ran them."""

        def __init__(self):
            super().__init__()
            self.owner, self.by = None, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.total
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.by[self.owner] = self.by.get(self.owner, 0) + self.total - before
            return out

    counters = []

    def owner(name):
        def hook(*args):
            counters[-1].owner = name

        return hook

    hooks = []
    for name in ("student", "teacher"):
        module = getattr(method.engines, name).module
        hooks += [module.register_forward_pre_hook(owner(name)), module.register_forward_hook(owner(None))]
    for _ in range(2):
        counters.append(ByModel())
        with counters[-1]:
            metrics, grids = trainer.validation.run(method)
    for n in (1, 2, 4):  # the image encoder's FDs, pooled and per bucket
        keys = [f"val/fd_image/{n}step", *(f"val/fd_image/{n}step/{b}" for b in HELD_OUT)]
        assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in keys)
        assert sorted(b for b in grids if b.startswith(f"val/{n}step/")) == sorted(f"val/{n}step/{b}" for b in HELD_OUT)
    for h in hooks:
        h.remove()
    first, second = (c.by for c in counters)  # None: outside the models (the FDs' covariances)
    assert (second["student"], second["teacher"]) == (cost.student, cost.teacher)
    assert (first["student"], first["teacher"]) == (cost.student, cost.teacher + cost.reference)

    batch = method.to_device(next(trainer.batches))
    with RecomputeFlops() as step:
        method.train_step([batch], 0)
    assert step.total == step_activations(cfg, models, flops=True).flops
    trainer.close()

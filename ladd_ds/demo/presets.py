"""The demo's settings: its size presets (`SIZES`), the ablation table (`ABLATIONS`), its tasks,
and the teacher's pretraining settings and sampler."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ladd_ds.core.errors import InputError
from ladd_ds.demo.pretrain import PretrainSettings

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# Share of the demo's prompts (teacher pretraining, synth, evaluation, real images, DPO pairs) that
# leave the place open ("a red seven"): see digits.random_label and docs/demo.md, "What the demo shows".
OPEN_PLACE = 0.0
DEMO_TASKS = ("t2i", "inpaint", "edit")  # `ladd-ds demo --tasks` (`--tasks all`: every one)
# The default: text-to-image only. Each task adds its own teacher's pretraining on the first run
# and its stages on every run (README, "The demo", has their times).
DEFAULT_TASKS = ("t2i",)


@dataclass
class DemoSize:
    pretrain_steps: int
    classifier_steps: int
    synth_prompts: int
    train_steps: int
    eval_prompts: int
    num_real: int
    seeds: list[int]
    teacher_steps: list[int]  # the table needs 50 (or the largest), 4 and 1
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    grid_prompts: int = 8
    grid_columns: int = 6
    sample_every: int = 100
    dpo_prompts: int = 320  # prompts ranked by `ladd-ds pairs` (K samples each): each of the 140 about twice
    dpo_steps: int = 150
    heldout_prompts: int = 96  # prompts of digits.HELD_OUT_COMBINATIONS, never in synth or LADD training
    heldout_seeds: list[int] = field(default_factory=lambda: [10, 11, 12])  # noise seeds the main table never uses
    # Other (schedule shift, CFG) settings of the teacher's sampler, each at 4 steps and the top step
    # count with the first seed: does the few-step gap depend on the sampler? The main table's
    # sampler is synth's (teacher_sampler()).
    sampler_sweep: list[tuple[float, float]] = field(default_factory=lambda: [(3.0, 3.0), (1.0, 1.5), (3.0, 1.5)])
    # Independent LADD runs of the main table (run.seed 0, 1, ...: heads, noise draws, data order),
    # pooled in the student rows: one run's margins move by more than some goals' gaps.
    train_seeds: int = 1
    # deepspeed.precision of every stage after the (fp32-pretrained) teacher: synth, LADD, export,
    # pairs, DPO, and the sampling of the evaluation (`ladd-ds demo --precision`).
    precision: str = "fp32"
    # Pretraining steps of the inpainting and editing teachers (from the text-to-image teacher);
    # None: pretrain.TASK_SETTINGS.
    task_pretrain_steps: int | None = None
    # LADD steps of the task students ({task: steps}); a task not listed trains `train_steps`.
    task_train_steps: dict[str, int] = field(default_factory=dict)
    # Steps of the teacher's sampler in `ladd-ds synth` and `ladd-ds pairs` (synth.num_steps,
    # pairs.steps); None: configs/demo.yaml's. The evaluation's teacher rows use `teacher_steps`.
    synth_steps: int | None = None
    # Validation during the main LADD runs (eval.every): a held-out synth set of `val_prompts`
    # prompts (other draws than synth's, half per bucket), the student's FD against it every
    # `val_every` steps; the report's training curves.
    val_prompts: int = 64
    val_every: int = 50


SIZES = {
    "full": DemoSize(
        pretrain_steps=3000,
        classifier_steps=1000,
        synth_prompts=1024,
        train_steps=300,
        eval_prompts=192,
        num_real=1000,
        seeds=[0, 1, 2],
        teacher_steps=[1, 2, 4, 8, 50],
        # The 1-step inpainting student after 300 steps: FD 1.27x the 50-step teacher's; after 600:
        # 0.68x (docs/demo.md, "Inpainting and editing in the demo").
        task_train_steps={"inpaint": 600},
    ),
    # The test suite's version: every stage runs and produces its outputs, in minutes. Two noise
    # seeds (a mean and a std per row) and 4-step synth and pairs: the tests check what each stage
    # writes and that the tables are the evaluation's numbers, not the teacher's samples' quality.
    "test": DemoSize(
        pretrain_steps=8,
        classifier_steps=30,
        synth_prompts=64,
        train_steps=4,
        eval_prompts=16,
        num_real=64,
        seeds=[0, 1],
        heldout_seeds=[10, 11],
        synth_steps=4,
        teacher_steps=[1, 4, 8],
        grid_prompts=2,
        grid_columns=2,
        sample_every=2,
        dpo_prompts=8,
        dpo_steps=2,
        heldout_prompts=8,
        task_pretrain_steps=4,
        val_prompts=8,
        val_every=2,
    ),
}

# Each ablation: a name, what it changes, and the `--set` overrides of the LADD run.
ABLATIONS = [
    ("real data", "trained on encoded real training images instead of teacher samples", {"data": "real"}),
    ("re-noise m=1 (paper)", "ladd.renoise_m = 1", {"set": ["ladd.renoise_m=1.0"]}),
    ("re-noise m=0", "ladd.renoise_m = 0", {"set": ["ladd.renoise_m=0.0"]}),
    ("heads on last block only", "discriminator.taps = [last block]", {"set": ["discriminator.taps=[LAST]"]}),
    ("without distillation loss", "ladd.distill_weight = 0", {"set": ["ladd.distill_weight=0.0"]}),
    ("unguided distillation target", "ladd.distill_cfg = 1 (default: the data's CFG)", {"set": ["ladd.distill_cfg=1.0"]}),
    # The paper's .7/.1/.1/.1 trains the times a 4-step sampler visits after the first (.75, .5,
    # .25) on 30% of the samples: does that explain a student that is worse at 4 steps than at 1?
    (
        "uniform student timesteps",
        "ladd.student_probs = [.25, .25, .25, .25] (default: .7/.1/.1/.1)",
        {"set": ["ladd.student_probs=[0.25,0.25,0.25,0.25]"]},
    ),
]


def teacher_settings(size: DemoSize) -> PretrainSettings:
    """The demo teacher's pretraining settings at `size` (also `ladd-ds pretrain-teacher`'s)."""
    return replace(PretrainSettings(), steps=size.pretrain_steps, open_place=OPEN_PLACE)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def ablation_slugs() -> list[str]:
    """The names `--ablations NAME,...` takes: each ablation's name as a slug (e.g. real_data)."""
    return [slug(name) for name, _, _ in ABLATIONS]


def select_ablations(ablations: bool | list[str]) -> list[tuple]:
    """The ABLATIONS entries to run: all (True), none (False) or those named by slug."""
    if ablations is True or ablations is False:
        return list(ABLATIONS) if ablations else []
    unknown = sorted(set(ablations) - set(ablation_slugs()))
    if unknown:
        raise InputError(f"--ablations: unknown {unknown}; the ablations are {', '.join(ablation_slugs())}")
    return [a for a in ABLATIONS if slug(a[0]) in ablations]


def teacher_sampler() -> tuple[float, float]:
    """(schedule shift, CFG scale) of the teacher everywhere in the demo: the sampler synth
    generates the LADD data with (configs/demo.yaml, synth.shift and synth.guidance_scale), so
    the teacher rows show the very teacher the student learns from."""
    from ladd_ds.config import load_config

    synth = load_config(DEMO_CONFIG).synth
    return synth.shift, synth.guidance_scale

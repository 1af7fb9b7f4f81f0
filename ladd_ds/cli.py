"""`ladd-ds` / `python -m ladd_ds`: parse arguments, load the config, build, run, close.

Each command imports what it runs inside its function: the rest of the package imports torch
(and deepspeed, diffusers), seconds on a cold start, which `ladd-ds --help` and a mistyped
argument should not wait for (tests/test_cli_startup.py keeps them out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ladd_ds.config import Config, load_config
from ladd_ds.core.errors import InputError, LaddError
from ladd_ds.core.lock import FileLock
from ladd_ds.core.outputs import absolute
from ladd_ds.core.precision import PRECISIONS
from ladd_ds.training.logfile import capture_warnings


def _train_parser(sub, name: str = "train", help: str = "LADD training (also under `deepspeed --module ladd_ds train`)") -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny_cpu.yaml")
    p.add_argument("--run-dir", help="run directory (default: run.run_dir of the config)")
    p.add_argument("--max-steps", type=int, help="override run.max_steps")
    p.add_argument("--seed", type=int, help="override run.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate, build models on the meta device, print sizes, exit")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run (default: current)")
    p.add_argument(
        "--allow-change",
        default=None,
        metavar="KEY,...",
        help="resume although these config keys (or sections) changed what is trained; recorded in config_history.jsonl",
    )
    p.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        help="memory per device that `auto` ZeRO stages plan against (sets deepspeed.device_memory_gib; default: this machine's)",
    )
    p.add_argument(
        "--interconnect",
        default=None,
        metavar="INTRA,INTER,GPUS_PER_NODE",
        help="Gbit/s per GPU within a node and between nodes, GPUs per node, e.g. 3600,400,8 (sets deepspeed.interconnect): "
        "--dry-run then times communication and `auto` picks the fastest placement that fits",
    )
    p.add_argument(
        "--achieved-tflops",
        type=float,
        default=None,
        help="TFLOP/s per GPU assumed for the compute time (sets deepspeed.achieved_tflops)",
    )


def cmd_train(args) -> int:
    """`ladd-ds train` and `ladd-ds dpo`: the config's method (ladd_ds.methods.method_for) in the
    training loop, or its dry run."""
    from ladd_ds.methods import method_for

    cfg = _train_config(args)
    return _run_trainer(args, cfg, method_for(cfg, args.command))


def _train_config(args) -> Config:
    overrides, labels = list(args.set), {}
    for flag, key, value in (
        ("--run-dir", "run.run_dir", args.run_dir),
        ("--max-steps", "run.max_steps", args.max_steps),
        ("--seed", "run.seed", args.seed),
        ("--device-memory-gib", "deepspeed.device_memory_gib", args.device_memory_gib),
        ("--achieved-tflops", "deepspeed.achieved_tflops", args.achieved_tflops),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
            labels[overrides[-1]] = f"{flag} {value}"
    if args.interconnect is not None:
        from ladd_ds.training.comms_plan import Interconnect

        net = Interconnect.parse(args.interconnect)
        for key, value in (
            ("intra_node_gbps", net.intra_node_gbs * 8),
            ("inter_node_gbps", net.inter_node_gbs * 8),
            ("gpus_per_node", net.gpus_per_node),
        ):
            overrides.append(f"deepspeed.interconnect.{key}={value}")
            labels[overrides[-1]] = f"--interconnect {args.interconnect}"
    if args.world_size is not None and not args.dry_run:
        raise InputError(
            "--world-size: only --dry-run plans for an assumed world size; a run's world size is the number of "
            "ranks it is launched on (deepspeed --num_gpus N, torchrun --nproc-per-node N). Leave it out or add --dry-run"
        )
    if args.world_size is not None and args.world_size < 1:
        raise InputError(f"--world-size {args.world_size}: must be >= 1")
    return load_config(args.config, overrides, command=args.command, labels=labels)


def _run_trainer(args, cfg: Config, method) -> int:
    from ladd_ds.distributed.ranks import print0, world_size
    from ladd_ds.distributed.stop import StopRequested
    from ladd_ds.training.trainer import Trainer, TrainingHealthError

    if args.dry_run:
        report = method.dry_run(cfg, args.world_size or world_size())
        print(report.text, flush=True)
        if report.problems:  # the report above is complete; the exit status says the run cannot start
            raise InputError(f"--dry-run: the run could not start: {'; '.join(p.rstrip('.') for p in report.problems)}")
        return 0
    allow = [k.strip() for k in args.allow_change.split(",") if k.strip()] if args.allow_change else None
    trainer = Trainer(cfg, cfg.run.run_dir, method, allow_change=allow)
    try:
        trainer.fit(cfg.run.max_steps)
    except TrainingHealthError as e:
        print0(f"ladd-ds {args.command}: stopped: {e}")
        return 3
    except StopRequested as e:  # SIGINT / SIGTERM, after a checkpoint every rank saved
        print0(f"ladd-ds {args.command}: {e}")
        return e.exit_code
    else:
        print0(f"done: step {trainer.step}, run directory {cfg.run.run_dir}")  # before close: into the log file too
        return 0
    finally:
        trainer.close()


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a LADD student (and heads) or a DPO LoRA/model from a run's checkpoint")
    p.add_argument("--run", required=True, help="run directory of a ladd-ds train or dpo run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of the student")
    p.add_argument("--lora", default=None, help="LADD run: fold this LoRA folder (e.g. a DPO export's lora/) into the student")
    p.add_argument("--merge", action="store_true", help="DPO run: also write the model with its LoRA folded in")
    p.add_argument(
        "--dtype", choices=PRECISIONS, default="bf16", help="bf16 (default) or fp32: the exported transformer's precision"
    )
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file of the transformer, e.g. 5GB, 500MB")
    p.add_argument("--out", required=True, help="output folder (written atomically; replaces only an export of the same run)")
    _overwrite_arg(p, "an export of another run")


def _overwrite_arg(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"also replace {what} at --out (anything else is refused)")


def cmd_export(args) -> int:
    from ladd_ds.export import export_run

    a = args
    out = export_run(
        a.run,
        a.out,
        step=a.step,
        ema=a.ema,
        lora=a.lora,
        merge=a.merge,
        dtype=a.dtype,
        shard_size=a.shard_size,
        overwrite=a.overwrite,
    )
    print(f"exported to {out}")
    return 0


def _convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="convert a run's checkpoint for another world size (DeepSpeed universal format), resumably, in one process",
    )
    p.add_argument("--run", required=True, help="run directory of a ladd-ds train or dpo run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")


def cmd_convert(args) -> int:
    from ladd_ds.training.convert import convert_run

    convert_run(Path(args.run), args.step)
    return 0


def _config_args(p) -> None:
    p.add_argument("--config", required=True, help="YAML run config (model.teacher and the synth section)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")


def _synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="generate training latents with the teacher (also under deepspeed)")
    _config_args(p)
    p.add_argument("--prompts", help="prompt file (default: synth.prompts); inpaint/edit: JSONL {prompt, image[, mask]}")
    p.add_argument("--out", help="output directory (default: synth.out)")
    _task_args(p)


def cmd_synth(args) -> int:
    cfg = load_config(args.config, args.set)
    prompts = args.prompts or cfg.synth.prompts
    if not prompts:
        raise InputError("no prompts: pass --prompts FILE or set synth.prompts")
    from ladd_ds.generate.synth import run_synth

    run_synth(cfg, prompts=prompts, out=args.out or cfg.synth.out, task=args.task or cfg.ladd.task, mask_kinds=_mask_kinds(args))
    return 0


def _encode_parser(sub) -> None:
    p = sub.add_parser("encode", help="encode captioned images with the VAE into training shards")
    _config_args(p)
    p.add_argument("--images", help="image folder (default: synth.images)")
    p.add_argument(
        "--captions",
        help="JSONL {file, caption} or file<TAB>caption lines; edit: JSONL {source, target, prompt} (default: synth.captions)",
    )
    p.add_argument("--out", help="output directory (default: synth.out)")
    _task_args(p)


def _task_args(p) -> None:
    p.add_argument("--task", choices=["t2i", "inpaint", "edit"], default=None, help="data layout (default: ladd.task, t2i)")
    p.add_argument(
        "--mask-kinds",
        default=None,
        help="inpaint: random mask kinds, comma-separated (default box,stroke,border; or quadrant)",
    )


def _mask_kinds(args) -> tuple[str, ...] | None:
    return tuple(args.mask_kinds.split(",")) if args.mask_kinds else None


def cmd_encode(args) -> int:
    cfg = load_config(args.config, args.set)
    images, captions = args.images or cfg.synth.images, args.captions or cfg.synth.captions
    if not images or not captions:
        raise InputError("pass --images DIR and --captions FILE (or set synth.images / synth.captions)")
    from ladd_ds.generate.encode import run_encode

    run_encode(
        cfg,
        images=images,
        captions=captions,
        out=args.out or cfg.synth.out,
        task=args.task or cfg.ladd.task,
        mask_kinds=_mask_kinds(args),
    )
    return 0


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a student (export or run) or a teacher (SD3 folder)")
    p.add_argument("--model", required=True, help="ladd-ds export folder, ladd-ds run directory, or diffusers SD3 folder")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with 'prompt'")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: a student's trained maximum, e.g. 4; a teacher's 28)",
    )
    p.add_argument("--cfg", type=float, default=None, help="teacher guidance scale (default 4; the student has none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (one grid row per prompt)")
    p.add_argument("--size", default=None, help="HxW in pixels (default: the model's sample size)")
    p.add_argument("--lora", default=None, help="apply this LoRA folder (e.g. a DPO export's lora/) to the model")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="transformer and text encoders dtype")
    p.add_argument("--out", required=True, help="output path: writes OUT.png (grid) and OUT.npz (images, prompt index)")
    _overwrite_arg(p, "samples of another model")
    p.add_argument("--image", default=None, help="inpaint/edit model: the image to inpaint or edit (cut to the sample size)")
    p.add_argument("--mask", default=None, help="inpaint model: mask image, white = fill in (also writes OUT_pasted.png/.npz)")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


def cmd_sample(args) -> int:
    from ladd_ds.sampling import check_sample_args, check_sample_outputs, run_sample

    check_sample_args(args.prompts, steps=args.steps, per_prompt=args.per_prompt, size=args.size)  # before a run is exported

    def sample(model: str) -> None:
        a = args
        run_sample(
            model, prompts_file=a.prompts, steps=a.steps, cfg=a.cfg, seed=a.seed, out=a.out, per_prompt=a.per_prompt,
            size=a.size, lora=a.lora, precision=a.precision, image=a.image, mask=a.mask,
            source=str(absolute(a.model)), overwrite=a.overwrite,
        )  # fmt: skip

    if is_run_dir(args.model):  # its latest checkpoint, exported to a temporary folder first
        from ladd_ds.export import export_run  # imports deepspeed, which sampling an export folder does not need

        check_sample_outputs(args.out, str(absolute(args.model)), args.overwrite)  # before the export
        with tempfile.TemporaryDirectory() as tmp:
            # exported in the precision it samples in: exact
            sample(str(export_run(args.model, Path(tmp) / "student", dtype=args.precision)))
    else:
        sample(args.model)
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="sample models at several step counts on a prompt set: FD, KID, CLIP score, cost (also under deepspeed)"
    )
    p.add_argument("--model", action="append", default=[], help="ladd-ds export or diffusers SD3 folder (repeatable)")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with 'prompt' [, 'bucket', 'seed']")
    p.add_argument("--steps", default="1,2,4", help="step counts of every --model (default 1,2,4)")
    p.add_argument("--teacher", default=None, help="a teacher folder, sampled with CFG at --teacher-steps")
    p.add_argument("--teacher-steps", default=None, help="the teacher's step counts (default 28)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale of teachers (default 4; students have none)")
    p.add_argument("--reference", default=None, help="FD/KID reference: a folder of images")
    p.add_argument(
        "--reference-model",
        default=None,
        help="FD/KID reference: this model's samples of the same prompts under other seeds (default: the --teacher's)",
    )
    p.add_argument(
        "--reference-steps", type=int, default=None, help="the reference model's steps (default: the largest teacher steps)"
    )
    p.add_argument(
        "--features",
        default=None,
        help="FD/KID features: FID Inception-v3 weights file, or an image-encoder folder (DINOv2, CLIP)",
    )
    p.add_argument("--clip", default=None, help="CLIP folder for the CLIP score")
    p.add_argument("--metrics", default=None, help="comma-separated: fd, kid, clip, cost (default: every one its inputs allow)")
    p.add_argument(
        "--sizes",
        default=None,
        help="HxW,... : every prompt at every size (default: each prompt's JSONL bucket or the model's size)",
    )
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt and size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="transformer and text encoders dtype (default bf16)")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled at once per rank")
    p.add_argument("--grid-prompts", type=int, default=4, help="prompts shown side by side in grid_<bucket>.png")
    p.add_argument("--out", required=True, help="output folder: report.md, results.json, plots/, grids, cells/")
    _overwrite_arg(p, "an evaluation of other settings")


def _str_list(value: str | None) -> list[str] | None:
    """A comma-separated flag's items, or None when the flag was not given."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str | None, flag: str) -> list[int]:
    if value is None:
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag} {value}: expected comma-separated integers, e.g. 1,2,4") from None


def cmd_evaluate(args) -> int:
    from ladd_ds.quality.evaluate import Options
    from ladd_ds.quality.run import run_evaluate

    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be >= 1")
    options = Options(
        models=args.model,
        prompts=args.prompts,
        out=args.out,
        steps=_int_list(args.steps, "--steps"),
        teacher=args.teacher,
        teacher_steps=_int_list(args.teacher_steps, "--teacher-steps"),
        cfg=args.cfg,
        reference=args.reference,
        reference_model=args.reference_model,
        reference_steps=args.reference_steps,
        features=args.features,
        clip=args.clip,
        metrics=_str_list(args.metrics),
        sizes=_str_list(args.sizes),
        per_prompt=args.per_prompt,
        seed=args.seed,
        precision=args.precision,
        batch_size=args.batch_size,
        grid_prompts=args.grid_prompts,
        overwrite=args.overwrite,
    )
    run_evaluate(options)
    return 0


def _pairs_parser(sub) -> None:
    p = sub.add_parser("pairs", help="preference pairs for DPO: sample K images per prompt and rank them, or import a set")
    _config_args(p)
    p.add_argument("--out", help="output directory (default: pairs.out)")
    p.add_argument("--import-pairs", default=None, help="JSONL {prompt, winner, loser} of an existing preference set")
    p.add_argument("--images", default=None, help="with --import-pairs: the folder of its images")


def cmd_pairs(args) -> int:
    from ladd_ds.generate.pairs import import_pairs, make_pairs

    cfg = load_config(args.config, args.set)
    if args.import_pairs:
        if not args.images:
            raise InputError("--import-pairs needs --images DIR (the folder of the winner/loser images)")
        summary = import_pairs(cfg, preferences=args.import_pairs, images=args.images, out=args.out)
    else:
        summary = make_pairs(cfg, args.out)
    if summary is not None:  # rank 0
        print(f"pairs: {summary['pairs']} pairs in {args.out or cfg.pairs.out} ({summary['skipped']} prompts or lines skipped)")
    return 0


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain-teacher", help="demo helper: train the small digits teacher with rectified flow")
    p.add_argument(
        "--out", required=True, help="output folder (an SD3-style diffusers folder; replaces only a teacher of the same settings)"
    )
    _overwrite_arg(p, "a teacher of other settings")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the full demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task",
        choices=["t2i", "inpaint", "edit"],
        default="t2i",
        help="t2i: the text-to-image teacher; inpaint/edit: a conditioned teacher started from the t2i one",
    )
    p.add_argument(
        "--cache", default=None, help="inpaint/edit: where the t2i teacher they start from is cached (default: ~/.cache/ladd_ds)"
    )


def cmd_pretrain(args) -> int:
    from ladd_ds.demo.presets import SIZES, teacher_settings
    from ladd_ds.demo.pretrain import pretrain_teacher, task_settings

    settings = replace(teacher_settings(SIZES["full"]), seed=args.seed)
    if args.task != "t2i":
        settings = task_settings(args.task, settings)
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    cache = Path(args.cache or Path.home() / ".cache" / "ladd_ds")
    print(f"teacher written to {pretrain_teacher(args.out, settings, cache_dir=cache, overwrite=args.overwrite)}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on colored digits: teacher, synth, LADD, sample, evaluate, report")
    p.add_argument("--out", required=True, help="output directory (report.md, grids, runs, data)")
    p.add_argument(
        "--cache", default=None, help="where the pretrained teacher and classifier are cached (default: ~/.cache/ladd_ds)"
    )
    p.add_argument("--size", choices=["full", "test"], default="full", help="'test': a few-minute version for the test suite")
    p.add_argument(
        "--tasks",
        default="t2i",
        help="comma-separated demo tasks: t2i (text-to-image), inpaint, edit, or all (default: t2i; README: their times)",
    )
    p.add_argument(
        "--ablations",
        nargs="?",
        const="all",
        default=None,
        metavar="NAME,...",
        help="also run the ablation rows (each a LADD run + evaluation); optionally only the named ones "
        "(real_data, re_noise_m_1__paper, re_noise_m_0, heads_on_last_block_only, without_distillation_loss, "
        "unguided_distillation_target, uniform_student_timesteps)",
    )
    p.add_argument(
        "--dpo", action="store_true", help="also run the DPO recipe: DPO-LoRA on the teacher, LADD from it, LoRA on the student"
    )
    p.add_argument(
        "--sampler-sweep",
        action="store_true",
        help="also evaluate the teacher at 4 steps and its top step count under other sampler settings (shift, CFG)",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="precision of synth, LADD, DPO and sampling (teacher: fp32)"
    )
    p.add_argument(
        "--train-seeds",
        type=int,
        default=None,
        help="independent LADD runs of the main setting (run.seed 0..N-1), pooled in the student rows "
        "(default 1; each more costs about 8 minutes at the full size on 2 cores)",
    )


def _demo_tasks(value: str) -> list[str]:
    """`--tasks`: a comma-separated list, or "all" (every demo task)."""
    from ladd_ds.demo.presets import DEMO_TASKS

    if value.strip() == "all":
        return list(DEMO_TASKS)
    return [t.strip() for t in value.split(",") if t.strip()]


def cmd_demo(args) -> int:
    from ladd_ds.demo.pipeline import run_demo

    report = run_demo(
        args.out,
        cache=args.cache,
        size=args.size,
        ablations=False if args.ablations is None else True if args.ablations == "all" else args.ablations.split(","),
        dpo=args.dpo,
        sampler_sweep=args.sampler_sweep,
        precision=args.precision,
        train_seeds=args.train_seeds,
        tasks=_demo_tasks(args.tasks),
    )
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladd-ds", description="Latent Adversarial Diffusion Distillation on DeepSpeed")
    # The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK is in the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _train_parser(sub, "dpo", "Diffusion-DPO of model.teacher on preference pairs (LoRA or full; under deepspeed too)")
    _export_parser(sub)
    _convert_parser(sub)
    _synth_parser(sub)
    _encode_parser(sub)
    _sample_parser(sub)
    _evaluate_parser(sub)
    _pairs_parser(sub)
    _pretrain_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    capture_warnings()  # warnings that repeat at every step are shown once (training/logfile.py)
    commands = {
        "train": cmd_train,
        "dpo": cmd_train,
        "export": cmd_export,
        "convert-checkpoint": cmd_convert,
        "synth": cmd_synth,
        "encode": cmd_encode,
        "sample": cmd_sample,
        "evaluate": cmd_evaluate,
        "pairs": cmd_pairs,
        "pretrain-teacher": cmd_pretrain,
        "demo": cmd_demo,
    }
    try:
        return commands[args.command](args)
    except LaddError as e:
        # Bad input the user can fix: one clear line instead of a traceback. Anything else is a
        # bug and raises with its traceback.
        print(f"ladd-ds {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside training's steps (which stop with a checkpoint instead): what the command
        # committed so far (parts, checkpoints) stays; a re-run continues from there.
        print(f"ladd-ds {args.command}: interrupted (Ctrl-C); committed outputs are kept, run it again to go on", file=sys.stderr)
        return 130
    finally:
        FileLock.release_all()  # the run directory's or output's lock, also when main() runs in process


if __name__ == "__main__":
    sys.exit(main())

"""The memory plan of the SD3 configs at the sizes users ask about, as the markdown tables of
docs/performance.md ("Memory plans of the SD3 configs"):

    python -m evaluation.plan_tables

Each row is what `ladd-ds train --config C --dry-run --world-size N --device-memory-gib 80` plans
(ladd_ds.ladd.build.place_ladd_engines, the same function): the ZeRO stage `auto` picks for each
engine without an interconnect (by memory alone) and its GiB per GPU, the step's activation peak
and the phase it is in, and the total against the 90% of 80 GiB the plan may fill. Batch is
`data.micro_batch_size`; EMA on is `optim.ema_decay=0.999` (the student's EMA).
"""

from __future__ import annotations

from ladd_ds.config import load_config
from ladd_ds.distributed.zero_sizes import block_params, resolve_zero3_sizes
from ladd_ds.ladd.build import ENGINES, as_engines_hold, build_models, ladd_zero3_window, place_ladd_engines
from ladd_ds.training.build import engine_ds_config
from ladd_ds.training.placement import GIB, USABLE_FRACTION

DEVICE_GIB = 80
# (config, GPUs) as docs/performance.md reports them: the 8B config on one and eight nodes of 8,
# the 2B config on one GPU and one node.
CASES = [
    ("configs/sd3_large.yaml", 8),
    ("configs/sd3_large.yaml", 64),
    ("configs/sd3_medium.yaml", 1),
    ("configs/sd3_medium.yaml", 8),
]
BATCHES = (2, 4)
EMA = (False, True)


def row(config: str, world: int, batch: int, ema: bool) -> str:
    sets = [f"deepspeed.device_memory_gib={DEVICE_GIB}", f"data.micro_batch_size={batch}"]
    sets.append(f"optim.ema_decay={0.999 if ema else 0.0}")
    cfg = load_config(config, sets)
    _, p = place_ladd_engines(cfg, world, plan_always=True)
    engines = " | ".join(f"ZeRO-{p.stages[n]}, {p.memory[n].total / GIB:.1f}" for n in ("student", "heads", "teacher"))
    usable = DEVICE_GIB * GIB * USABLE_FRACTION
    verdict = "yes" if p.fits else f"**no** ({p.total / GIB:.1f} > {usable / GIB:.1f})"
    peak = f"{p.activations / GIB:.1f} ({p.steps.peak_phase})"
    name = config.split("/")[-1]
    return f"| {name} | {world} | {batch} | {'on' if ema else 'off'} | {engines} | {peak} | {p.total / GIB:.1f} | {verdict} |"


def rows() -> list[str]:
    out = [
        "| config | GPUs | batch | EMA | student: stage, GiB | heads: stage, GiB | teacher: stage, GiB "
        "| activations GiB (peak phase) | total GiB | fits 72 GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += [row(config, world, batch, ema) for config, world in CASES for batch in BATCHES for ema in EMA]
    return out


# The ZeRO-3 live window at 8 GPUs (it does not depend on the world size), bf16, per engine.
WINDOW_CONFIGS = ("configs/sd3_medium.yaml", "configs/sd3_large.yaml")
REUSE = ("template", 0)


def live_rows() -> list[str]:
    """The most parameters ZeRO-3 keeps gathered per engine in a LADD step with the GPU templates
    ("auto" gather sizes: one block prefetched, two live), replayed as the memory plan does
    (ladd_ds.ladd.build.ladd_zero3_window), with the templates' `stage3_max_reuse_distance` and
    with 0."""
    out = [
        "| config | engine | stage3_max_reuse_distance | gathered at most: blocks | GiB (bf16) | blocks in the model |",
        "|---|---|---|---|---|---|",
    ]
    world = 8
    for config in WINDOW_CONFIGS:
        cfg = load_config(config, [f"deepspeed.device_memory_gib={DEVICE_GIB}"])
        teacher, student, heads, _ = build_models(cfg, device="meta")
        models = {"teacher": teacher, "student": student, "heads": heads}
        as_engines_hold(cfg, models)  # as the plan's (rows): the same traces serve both tables
        window = ladd_zero3_window(cfg, world)
        for slot in (s for s in ENGINES if s.name != "heads"):
            template = engine_ds_config(cfg, world, slot.template_key, slot.trainable, stage=3)
            block = block_params(models[slot.name])
            for reuse in REUSE:
                ds_config = resolve_zero3_sizes(template, models[slot.name])
                zero = ds_config["zero_optimization"]
                if reuse != "template":
                    ds_config = {**ds_config, "zero_optimization": {**zero, "stage3_max_reuse_distance": reuse}}
                shown = f"{float(zero.get('stage3_max_reuse_distance', 1e9)):.0e} (template)" if reuse == "template" else reuse
                live = window(models, slot.name, ds_config)
                n = sum(p.numel() for p in models[slot.name].parameters())
                name = config.split("/")[-1]
                out.append(f"| {name} | {slot.name} | {shown} | {live / block:.2f} | {live * 2 / GIB:.2f} | {n / block:.1f} |")
    return out


def main() -> None:
    print("\n".join(rows()))
    print()
    print("\n".join(live_rows()))


if __name__ == "__main__":
    main()

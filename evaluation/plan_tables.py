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
from ladd_ds.ladd.build import place_ladd_engines
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


def main() -> None:
    print("\n".join(rows()))


if __name__ == "__main__":
    main()

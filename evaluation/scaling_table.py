"""The predicted step time and scaling efficiency of configs/sd3_large.yaml (8B student, 8B
teacher) at 8, 64 and 256 GPUs, as the markdown table of docs/performance.md ("Communication"):

    python -m evaluation.scaling_table

Every row is the communication plan (ladd_ds/training/comms_plan.py) of one placement on H100s
(80 GiB) with NVLink within a node of 8 (3600 Gbit/s per GPU) and one 400 Gbit/s NIC per GPU
between nodes, at the plan's default achieved TFLOP/s; the memory column is the memory plan's
(ladd_ds/training/placement.py; with hpZ, its secondary weight shards too). "auto" is the
placement `deepspeed.*_stage: auto` picks with that interconnect: the fastest that fits.
"""

from __future__ import annotations

import functools

from ladd_ds.config import load_config
from ladd_ds.ladd.build import ENGINES, build_models, ladd_comms_plan, ladd_layouts, ladd_zero3_window, step_activations
from ladd_ds.training.build import engine_ds_config, resolve_sizes
from ladd_ds.training.placement import GIB, USABLE_FRACTION, EngineNeeds, choose_placement, plan

CONFIG = "configs/sd3_large.yaml"
DEVICE_GIB = 80
INTERCONNECT = ["deepspeed.interconnect.intra_node_gbps=3600", "deepspeed.interconnect.inter_node_gbps=400"]
WORLDS = (8, 64, 256)
# (label, student, heads, teacher stage, hpZ group size of the ZeRO-3 engines)
PLACEMENTS = [
    ("student 2, heads 2, teacher 0", 2, 2, 0, 1),
    ("student 2, heads 2, teacher 3", 2, 2, 3, 1),
    ("student 3, heads 2, teacher 0", 3, 2, 0, 1),
    ("student 3, heads 2, teacher 3", 3, 2, 3, 1),
    ("student 3 + hpZ 8, heads 2, teacher 3 + hpZ 8", 3, 2, 3, 8),
]


def _configs(cfg, models: dict, world: int, stages: dict[str, int], hpz: int) -> dict[str, dict]:
    configs = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable, stage=stages[s.name]) for s in ENGINES}
    configs = resolve_sizes(configs, models)  # ZeRO-3's "auto" gather sizes, as the engines get them
    if hpz > 1 and world > hpz:
        for c in configs.values():
            if c["zero_optimization"]["stage"] == 3:
                c["zero_optimization"]["zero_hpz_partition_size"] = hpz
    return configs


def rows() -> list[str]:
    cfg = load_config(CONFIG, [f"deepspeed.device_memory_gib={DEVICE_GIB}", *INTERCONNECT])
    teacher, student, heads, _ = build_models(cfg, device="meta")
    models = {"teacher": teacher, "student": student, "heads": heads}
    # First: the count leaves the models as the engines hold them (training precision, teacher
    # frozen), and the traces below are then the ones the ZeRO-3 windows reuse (ladd_layouts).
    activations = step_activations(cfg, models).peak
    layouts = ladd_layouts(cfg, _configs(cfg, models, 8, {"student": 3, "heads": 2, "teacher": 3}, 1), models)
    out = [
        "| GPUs | placement | GiB per GPU | compute s | communication s | exposed s | step s | efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world in WORLDS:
        window = ladd_zero3_window(cfg, world)

        def needs(stages: dict[str, int | str], configs: dict[str, dict]) -> list[EngineNeeds]:
            return [
                EngineNeeds(
                    s.name,
                    models[s.name],
                    s.trainable,
                    stages[s.name],
                    configs[s.name],
                    live_window=functools.partial(window, models, s.name),
                )
                for s in ENGINES
            ]

        def memory(stages: dict[str, int], hpz: int) -> float:
            engines = needs(stages, _configs(cfg, models, world, stages, hpz))
            return plan(
                engines, stages=stages, world=world, precision="bf16", activations=activations, device_bytes=DEVICE_GIB * GIB
            ).total

        candidates = []
        for label, s, h, t, hpz in PLACEMENTS:
            stages = {"student": s, "heads": h, "teacher": t}
            if hpz > 1 and world <= hpz:
                continue  # one node: hpZ's group is the world
            candidates.append((label, stages, hpz))
        templates = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable) for s in ENGINES}
        auto = choose_placement(
            needs(dict.fromkeys(templates, "auto"), templates),
            world=world,
            precision="bf16",
            grad_accum=cfg.optim.grad_accum,
            activations=activations,
            device_bytes=DEVICE_GIB * GIB,
            step_time=lambda stages: ladd_comms_plan(cfg, world, _configs(cfg, models, world, stages, 1), layouts).step_s,
        )
        auto_label = ", ".join(f"{n} {auto.stages[n]}" for n in ("student", "heads", "teacher"))
        for label, stages, hpz in [(f"auto ({auto_label})", auto.stages, 1), *candidates]:
            p = ladd_comms_plan(cfg, world, _configs(cfg, models, world, stages, hpz), layouts)
            gib = memory(stages, hpz) / GIB
            fits = "" if gib <= DEVICE_GIB * USABLE_FRACTION else " (does not fit)"
            out.append(
                f"| {world} | {label} | {gib:.1f}{fits} | {p.compute_s:.2f} | {p.comm_s:.2f} | {p.exposed_s:.2f} | "
                f"{p.step_s:.2f} | {p.efficiency:.1%} |"
            )
    return out


def main() -> None:
    print("\n".join(rows()))


if __name__ == "__main__":
    main()

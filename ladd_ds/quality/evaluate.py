"""`ladd-ds evaluate`: sample models at several step counts on a prompt set and judge the images.

The evaluation is a table of cells, one per (model, step count): the students at `--steps`, the
teacher at `--teacher-steps` with its CFG. Every cell samples the same prompts with the same seeds
on every bucket (the prompt file's buckets, or every `--sizes` size for every prompt). The images
of a bucket are split over the ranks in contiguous blocks; each rank samples its block in batches
and keeps only what the metrics need (features, CLIP states, the grid's first images), so memory
does not grow with the prompt set.

Per cell and bucket (and over all buckets): FD and KID against the reference (an image folder, or
the teacher's own samples of the same prompts under other seeds), CLIP score, and the cost (network
evaluations, ms per image on one device, peak device memory). A finished cell is written to
OUT/cells/<name>/ and reused by a re-run with the same settings; adding a model or a step count
only samples the new cells. OUT/results.json, report.md, the plots and the side-by-side grids are
rewritten from every finished cell at the end (ladd_ds.quality.report).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ladd_ds.core.errors import InputError, LaddError, MissingInputError
from ladd_ds.core.files import commit_directory, temporary_sibling
from ladd_ds.core.noise import derive_seed
from ladd_ds.core.outputs import absolute, check_output, write_marker
from ladd_ds.data.prompts import bucket_name, parse_bucket
from ladd_ds.distributed.ranks import all_reduce_sum, barrier, broadcast_object, gather_rows, is_main, print0, world_size
from ladd_ds.quality.features import FeatureNetwork, features_of, load_feature_network
from ladd_ds.quality.jobs import by_bucket, files_stamp, image_files, load_jobs, my_block, read_image, same_size_groups
from ladd_ds.quality.metrics import ClipScorer, check_metrics, frechet_distance, kernel_distance
from ladd_ds.sampling import (
    TEACHER_STEPS,
    SamplingModel,
    check_size,
    default_size,
    generate,
    load_sampling_model,
    network_evaluations,
    student_schedule,
)

KIND = "evaluation"  # the output marker's kind (ladd_ds.core.outputs)
CELL_INFO = "cell.json"
ALL = "all"  # the results key over every bucket
GRID = "grid"  # the cell's grid images (uint8) by bucket, next to its features


@dataclass(frozen=True)
class Cell:
    """A model at one step count: a table row of the report."""

    label: str  # the report's row name, e.g. "student-a, 4 steps"
    model: str  # absolute path of the model folder
    model_name: str
    role: str  # "model", "teacher" or "reference" (the teacher's samples the FD is measured against)
    steps: int
    cfg: float

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.role}-{self.model_name}-{self.steps}steps")


@dataclass
class Settings:
    """What every cell shares: a folder of cells is continued only under the same settings."""

    prompts: str  # digest of the prompt file's jobs
    num_images: int
    buckets: list[str]
    metrics: list[str]
    features: str | None  # stamp of the feature network's files
    clip: str | None
    reference: str | None  # "folder <stamp>", "model <stamp> <steps> steps CFG <cfg>" or None
    precision: str
    seed: int
    grid_prompts: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Options:
    """`ladd-ds evaluate`'s arguments (cli.py builds them)."""

    models: list[str]
    prompts: str
    out: str
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher: str | None = None
    teacher_steps: list[int] = field(default_factory=list)
    cfg: float = 4.0
    reference: str | None = None
    reference_model: str | None = None
    reference_steps: int | None = None
    features: str | None = None
    clip: str | None = None
    metrics: list[str] | None = None
    sizes: list[str] | None = None
    per_prompt: int = 1
    seed: int = 0
    precision: str = "bf16"
    batch_size: int = 8
    grid_prompts: int = 4
    overwrite: bool = False


@dataclass
class CellResult:
    """What one cell measured: per bucket (and ALL) the metrics; the gathered features and grid
    images stay in the cell's folder."""

    cell: Cell
    key: str
    kind: str  # "teacher" or "student": how the model samples
    nfe: int
    buckets: dict[str, dict] = field(default_factory=dict)

    def record(self) -> dict:
        return {"cell": asdict(self.cell), "key": self.key, "kind": self.kind, "nfe": self.nfe, "buckets": self.buckets}


class Evaluation:
    """One `ladd-ds evaluate` run (module docstring). Every method is called on every rank."""

    def __init__(self, options: Options, device: torch.device):
        self.o = options
        self.device = device
        self.out = absolute(options.out)
        check_output(self.out, KIND, overwrite=True)  # not a file or another command's folder: before any model loads
        self.models: dict[str, SamplingModel] = {}
        self.cells = self._cells()
        metrics = options.metrics or self._default_metrics()
        self.metrics = check_metrics(
            metrics,
            features=options.features,
            clip=options.clip,
            reference=self.reference_cell is not None or bool(options.reference),
        )
        first = self._load(self.cells[0].model)
        default = bucket_name(*default_size(first))
        self.jobs = load_jobs(
            options.prompts, sizes=options.sizes, per_prompt=options.per_prompt, seed=options.seed, default=default
        )
        self.buckets = by_bucket(self.jobs)
        self.features: FeatureNetwork | None = None
        if {"fd", "kid"} & set(self.metrics):
            self.features = load_feature_network(options.features, device)
        self.clip = ClipScorer(options.clip, device) if "clip" in self.metrics else None
        self.settings = Settings(
            prompts=hashlib.sha256(json.dumps([asdict(j) for j in self.jobs]).encode()).hexdigest()[:16],
            num_images=len(self.jobs),
            buckets=list(self.buckets),
            metrics=self.metrics,
            features=files_stamp(options.features) if self.features else None,
            clip=files_stamp(options.clip) if self.clip else None,
            reference=self._reference_identity(),
            precision=options.precision,
            seed=options.seed,
            grid_prompts=options.grid_prompts,
        )

    def _default_metrics(self) -> list[str]:
        names = []
        if self.o.features and (self.o.reference or self.reference_cell):
            names += ["fd", "kid"]
        if self.o.clip:
            names.append("clip")
        return names + ["cost"]

    def _cells(self) -> list[Cell]:
        o = self.o
        if not o.models and not o.teacher:
            raise InputError("pass at least one --model (or a --teacher to evaluate)")
        if o.reference and o.reference_model:
            raise InputError("--reference and --reference-model both given; the FD has one reference: pass one of them")
        names = {}
        cells = []
        for spec in o.models + ([o.teacher] if o.teacher else []) + ([o.reference_model] if o.reference_model else []):
            if not Path(spec).is_dir():
                raise MissingInputError(f"{spec} is not a folder; pass a ladd-ds export or a diffusers SD3 folder")
            names.setdefault(str(absolute(spec)), self._unique_name(Path(spec).name, names))
        for spec in o.models:
            name = names[str(absolute(spec))]
            cells += [Cell(f"{name}, {_steps(s)}", str(absolute(spec)), name, "model", s, o.cfg) for s in o.steps]
        if o.teacher:
            name = names[str(absolute(o.teacher))]
            for s in o.teacher_steps or [TEACHER_STEPS]:
                label = name if "teacher" in name else f"{name} (teacher)"
                cells.append(Cell(f"{label}, {_steps(s)}", str(absolute(o.teacher)), name, "teacher", s, o.cfg))
        self.reference_cell = None
        reference = o.reference_model or (o.teacher if not o.reference else None)
        if reference is not None:
            name = names[str(absolute(reference))]
            steps = o.reference_steps or max(o.teacher_steps or [TEACHER_STEPS])
            self.reference_cell = Cell(
                f"reference: {name}, {_steps(steps)}", str(absolute(reference)), name, "reference", steps, o.cfg
            )
        if any(s < 1 for s in o.steps + o.teacher_steps):
            raise InputError(f"--steps / --teacher-steps must be >= 1, got {o.steps} / {o.teacher_steps}")
        return cells

    @staticmethod
    def _unique_name(name: str, taken: dict) -> str:
        out, k = name, 2
        while out in taken.values():
            out, k = f"{name}-{k}", k + 1
        return out

    def _reference_identity(self) -> str | None:
        if self.o.reference:
            files = image_files(self.o.reference)
            return f"folder {absolute(self.o.reference)} {len(files)} images {files_stamp(self.o.reference)}"
        c = self.reference_cell
        return None if c is None else f"model {files_stamp(c.model)} {c.steps} steps CFG {c.cfg:g}"

    def _load(self, model: str) -> SamplingModel:
        if model not in self.models:
            self.models[model] = load_sampling_model(model, device=self.device, precision=self.o.precision)
        return self.models[model]

    def cfg_of(self, sm: SamplingModel, cell: Cell) -> float:
        return 1.0 if sm.kind == "student" else cell.cfg  # the LADD student samples without guidance

    def check(self) -> None:
        """Before anything is sampled: every model makes every bucket and every step count."""
        for cell in self.cells + ([self.reference_cell] if self.reference_cell else []):
            sm = self._load(cell.model)
            for bucket in self.buckets:
                try:
                    check_size(sm, *parse_bucket(bucket))
                except InputError as e:
                    raise InputError(f"{cell.model}: {e}") from None
            if sm.kind == "student":
                try:
                    student_schedule(cell.steps, sm.trained)
                except InputError as e:
                    raise InputError(f"--model {cell.model}: {e}") from None

    # -- the output folder -------------------------------------------------------------------

    def prepare_out(self) -> None:
        """OUT is free, or an evaluation of the same settings (continued), or of others (replaced
        with --overwrite only: its cells are ours)."""
        digest = self.settings.digest()
        error = None
        if is_main():
            try:
                existing = check_output(self.out, KIND, source=digest, overwrite=self.o.overwrite)
            except LaddError as e:
                error = e
            else:
                if existing and self._read_settings() != asdict(self.settings):
                    print0(f"{self.out}: an evaluation of other settings; --overwrite: its cells are replaced")
                    shutil.rmtree(self.out / "cells", ignore_errors=True)
                self.out.mkdir(parents=True, exist_ok=True)
                write_marker(self.out, KIND, source=digest)
                _write_json(self.out / "settings.json", asdict(self.settings))
        error = broadcast_object(error)  # every rank stops with rank 0's refusal, none waits for it
        if error is not None:
            raise error
        barrier()

    def _read_settings(self) -> dict | None:
        try:
            return json.loads((self.out / "settings.json").read_text())
        except (OSError, ValueError):
            return None

    def cell_key(self, cell: Cell) -> str:
        """What a finished cell was made from: the cell, its model's files and the settings."""
        record = json.dumps([asdict(cell), files_stamp(cell.model), self.settings.digest()])
        return hashlib.sha256(record.encode()).hexdigest()[:16]

    def finished(self, cell: Cell) -> CellResult | None:
        path = self.out / "cells" / cell.folder / CELL_INFO
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != self.cell_key(cell):
            return None
        return CellResult(cell, record["key"], record["kind"], record["nfe"], record["buckets"])

    # -- sampling -----------------------------------------------------------------------------

    def sample_cell(self, cell: Cell) -> tuple[CellResult, dict[str, torch.Tensor]]:
        """Sample this rank's block of every bucket: the cell's cost and CLIP score (reduced over
        ranks), and the features of every image of every bucket in job order (gathered)."""
        sm = self._load(cell.model)
        cfg = self.cfg_of(sm, cell)
        result = CellResult(cell, self.cell_key(cell), sm.kind, network_evaluations(sm.kind, cell.steps, cfg))
        features: dict[str, torch.Tensor] = {}
        grids: dict[str, torch.Tensor] = {}
        reference = cell.role == "reference"
        total = sum(len(my_block(jobs)) for jobs in self.buckets.values())
        bar = tqdm(total=total, desc=cell.label, unit="image", disable=not is_main(), dynamic_ncols=True)
        for bucket, jobs in self.buckets.items():
            height, width = parse_bucket(bucket)
            mine = my_block(jobs)
            clip = self.clip.metric() if self.clip and not reference else None
            feats, seconds, grid = [], 0.0, []
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for i in range(0, len(mine), self.o.batch_size):
                batch = mine[i : i + self.o.batch_size]
                seeds = [derive_seed("reference", j.seed) if reference else j.seed for j in batch]
                images, took = generate(
                    sm, [j.prompt for j in batch], seeds, height=height, width=width, steps=cell.steps, cfg=cfg,
                    batch_size=self.o.batch_size,
                )  # fmt: skip
                seconds += took
                if self.features is not None:
                    feats.append(features_of(self.features, images, batch_size=self.o.batch_size))
                if clip is not None:
                    self.clip.update(clip, images, [j.prompt for j in batch])
                grid += [img for img, j in zip(images, batch) if j.prompt_index < self.o.grid_prompts]
                bar.update(len(batch))
            if self.features is not None:
                features[bucket] = gather_rows(torch.cat(feats) if feats else torch.zeros(0, self.features.num_features))
            grids[bucket] = gather_rows(_uint8(grid, height, width))
            sums = all_reduce_sum(torch.tensor([seconds, float(len(mine))], dtype=torch.float64))
            peak = _peak_memory_gib(self.device)
            result.buckets[bucket] = {
                "images": len(jobs),
                "ms_per_image": 1000.0 * float(sums[0]) / max(float(sums[1]), 1.0),
                "peak_memory_gib": peak,
            }
            if clip is not None:
                result.buckets[bucket]["clip"] = float(clip.compute())  # states summed over ranks
        bar.close()
        features[GRID] = grids  # kept with the features in the cell folder
        result.buckets[ALL] = self._pooled(result)
        return result, features

    def reference_features(self) -> dict[str, torch.Tensor] | None:
        """The FD/KID reference per bucket (ALL: every reference image): the reference model's cell
        (sampled once and kept like any cell), or the reference folder's images (every bucket
        measured against the whole folder)."""
        if self.features is None:
            return None
        if self.reference_cell is not None:
            _, feats = self.run_cell(self.reference_cell, None)
            feats = {b: f for b, f in feats.items() if b != GRID}
            feats[ALL] = torch.cat(list(feats.values()))
            return feats
        cached = self.out / "reference_features.pt"
        identity = f"{self.settings.reference} {self.settings.features}"
        if cached.is_file():
            saved = torch.load(cached, weights_only=True)
            if saved.get("identity") == identity:
                return {ALL: saved["features"]}
        files = my_block(image_files(self.o.reference))
        feats = []
        bar = tqdm(total=len(files), desc="reference images", unit="image", disable=not is_main(), dynamic_ncols=True)
        for group in same_size_groups(files, self.o.batch_size):
            feats.append(features_of(self.features, torch.stack([read_image(f) for f in group]), batch_size=self.o.batch_size))
            bar.update(len(group))
        bar.close()
        all_feats = gather_rows(torch.cat(feats) if feats else torch.zeros(0, self.features.num_features))
        if is_main():
            _atomic_save({"identity": identity, "features": all_feats}, cached)
        barrier()
        return {ALL: all_feats}

    def run_cell(self, cell: Cell, reference: dict | None) -> tuple[CellResult, dict]:
        """A finished cell from its folder, or sampled now, measured against `reference` and
        written (rank 0, atomically: a cell folder is complete or absent)."""
        folder = self.out / "cells" / cell.folder
        done = self.finished(cell)
        if done is not None:
            print0(f"{cell.label}: finished before, reused ({folder})")
            return done, torch.load(folder / "features.pt", weights_only=True)
        result, feats = self.sample_cell(cell)
        self._distances(result, feats, reference)
        if is_main():
            tmp = temporary_sibling(folder)
            torch.save(feats, tmp / "features.pt")
            _write_json(tmp / CELL_INFO, result.record())
            commit_directory(tmp, folder)
        barrier()
        return result, feats

    def run(self) -> list[CellResult]:
        self.check()
        self.prepare_out()
        reference = self.reference_features()
        return [self.run_cell(cell, reference)[0] for cell in self.cells]

    def _distances(self, result: CellResult, feats: dict, reference: dict | None) -> None:
        """FD and KID per bucket and over ALL, against the reference of the same bucket (a
        reference model's) or the folder's (ALL)."""
        buckets = [b for b in feats if b != GRID]
        if reference is None or not buckets:
            return
        feats = dict(feats)
        feats[ALL] = torch.cat([feats[b] for b in buckets])
        for bucket in [*buckets, ALL]:
            real = reference.get(bucket, reference[ALL])
            fake = feats[bucket]
            if len(real) < 2 or len(fake) < 2:
                continue
            if "fd" in self.metrics:
                result.buckets[bucket]["fd"] = frechet_distance(real, fake)
            if "kid" in self.metrics:
                result.buckets[bucket]["kid"], result.buckets[bucket]["kid_std"] = kernel_distance(real, fake)

    @staticmethod
    def _pooled(result: CellResult) -> dict:
        """ALL's cost and CLIP: means over the buckets weighted by their images."""
        rows = list(result.buckets.values())
        n = sum(r["images"] for r in rows)
        out = {"images": n, "ms_per_image": sum(r["ms_per_image"] * r["images"] for r in rows) / n}
        peaks = [r["peak_memory_gib"] for r in rows if r["peak_memory_gib"] is not None]
        out["peak_memory_gib"] = max(peaks) if peaks else None
        if all("clip" in r for r in rows):
            out["clip"] = sum(r["clip"] * r["images"] for r in rows) / n
        return out


def _steps(n: int) -> str:
    return f"{n} step" + ("s" if n != 1 else "")


def _uint8(images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, height, width, dtype=torch.uint8)
    return (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


def _peak_memory_gib(device: torch.device) -> float | None:
    """The most device memory any rank allocated since the bucket started; None on the CPU
    (the host's allocator keeps no such count)."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64)
    if world_size() > 1:
        import torch.distributed as dist

        peak = peak.to(device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _atomic_save(value, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(value, tmp)
    tmp.replace(path)

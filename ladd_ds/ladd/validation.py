"""Validation during training (`eval.every`; docs/evaluation.md, "During training").

Every `eval.every` steps (and at the last step) the student samples the held-out prompts of
`eval.data`, a `ladd-ds synth` dataset that training never reads, at each validated step count,
from fixed noise, and is measured against the teacher's samples stored in that dataset:
  - FD in the teacher's token-feature space ("tokens"; needs no extra weights): both sample sets
    are re-noised to `eval.token_t` with the same fixed noise per prompt and read by the frozen
    teacher; the tapped blocks' tokens (those the discriminator heads read), averaged over the
    latent grid, are one feature set per tap; the FD is the mean over taps.
  - with `eval.features`, FD in an image encoder's feature space (Inception-v3 or a transformers
    encoder such as DINOv2; ladd_ds.quality.features) of the decoded images.
Per bucket and over all buckets pooled, logged to TensorBoard as val/fd_<space>/<N>step[/<bucket>],
with a grid per step count and bucket (teacher row above student row).

Every rank samples its contiguous block of each bucket; the blocks are padded to the longest so
that every rank runs the same forwards (a ZeRO-3 student or teacher needs all ranks in each).
The features are gathered on every rank, and the FDs are shared out: each rank computes every
world-th one and a sum over ranks gives all of them to all. Rank 0 only writes the log. The
teacher's reference features are computed at the first validation and kept (the teacher is
frozen); a resumed run computes them again, to the same values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ladd_ds.config import Config, EvalConfig
from ladd_ds.core import flow
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.noise import derive_seed
from ladd_ds.data.checks import DataPlan, check_stored_shapes, read_samples
from ladd_ds.data.loader import bucket_dirs, is_remote, stored_tensor
from ladd_ds.data.schema import validate_mds_dir
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import all_reduce_sum, gather_rows, is_main, rank, world_size
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.quality.features import features_of, load_feature_network
from ladd_ds.quality.jobs import my_block
from ladd_ds.quality.metrics import frechet_distance
from ladd_ds.sampling import (
    TrainedTimes,
    decode_images,
    image_grid,
    initial_noise,
    ladd_sample,
    student_schedule,
    trained_step_counts,
)

DEFAULT_STEPS = (1, 2, 4)  # eval.steps null: those of them the run trains (ladd.student_timesteps)
TOKENS = "tokens"  # the feature space of the teacher's tapped tokens
IMAGE = "image"  # the feature space of eval.features
ALL = "all"  # every bucket pooled


def validated_steps(cfg: Config) -> list[int]:
    """eval.steps, or the default step counts the run trains; a step count whose schedule uses an
    untrained time is refused (sampling.student_schedule's error, named by the key)."""
    trained = TrainedTimes.from_config(cfg.ladd)
    if cfg.eval.steps is None:
        return [n for n in DEFAULT_STEPS if n in trained_step_counts(trained)]
    for n in cfg.eval.steps:
        try:
            student_schedule(n, trained)
        except InputError as e:
            raise InputError(f"eval.steps: {e}") from None
    return sorted(set(cfg.eval.steps))


def check_eval_data(cfg: Config, layout) -> list:
    """The held-out datasets of eval.data (one per bucket), checked: local, written for this
    task's layout, and not the training data."""
    path = cfg.eval.data
    if is_remote(path):
        raise InputError(f"eval.data {path}: the held-out set is read directly on every rank; give a local folder")
    root = Path(path)
    if not root.exists():
        raise MissingInputError(f"eval.data {root} does not exist: write a held-out set with `ladd-ds synth` (other prompts)")
    if cfg.data.path is not None and root.resolve() == Path(cfg.data.path).resolve():
        raise InputError(
            f"eval.data is data.path ({root}): validation needs prompts that training never sees; write a "
            "held-out set with `ladd-ds synth` from other prompts"
        )
    buckets = bucket_dirs(root)
    for d in buckets or [root]:
        validate_mds_dir(d, layout)
    plan = DataPlan(root, buckets, 0, {})
    check_stored_shapes(plan, layout, resolve_model_config(cfg.model.teacher), cfg.model.teacher, key="eval.data")
    return plan.datasets


@dataclass
class Bucket:
    """This rank's block of one held-out bucket, padded to the longest block of any rank."""

    name: str
    batch: dict  # column -> (L, ...) on the CPU, L = the padded block length
    index: list[int]  # the samples' indices in the bucket (padding repeats the last one)
    real: int  # how many of the L rows are this rank's own samples (the rest is padding)
    shown: int  # how many samples of the bucket the grids show


class Validation:
    """Holds the held-out set and the reference features; `run(method)` validates."""

    def __init__(self, cfg: Config, method):
        """`method`: the LADD method (its engines, taps, model_input, device and dtype)."""
        self.cfg = cfg
        self.e = cfg.eval
        self.steps = validated_steps(cfg)
        self.trained = TrainedTimes.from_config(cfg.ladd)
        columns = ("latent", "prompt_embeds", "pooled", *method.condition_columns)
        self.buckets = [self._bucket(d, columns) for d in check_eval_data(cfg, method.data_layout(cfg))]
        model_cfg = resolve_model_config(cfg.model.student or cfg.model.teacher)
        self.channels = latent_channels(model_cfg)
        self.features = None
        if self.e.features is not None:
            self.features = load_feature_network(self.e.features, method.device, what="eval.features")
        needs_codec = self.features is not None or self.e.images > 0
        self.codec = load_codec(cfg.codec.vae, self.channels, seed=cfg.codec.seed).to(method.device) if needs_codec else None
        self.reference: dict[str, dict[str, torch.Tensor]] | None = None  # space -> bucket -> (N, K, D) / (N, F)
        self.reference_images: dict[str, torch.Tensor] = {}

    def _bucket(self, root, columns: tuple[str, ...]) -> Bucket:
        samples = read_samples(root, self.e.num_samples)
        if len(samples) < 2:
            raise InputError(f"eval.data {root}: {len(samples)} sample(s); an FD needs at least 2 per bucket")
        blocks = [my_block(list(range(len(samples))), of_rank=r) for r in range(world_size())]
        mine = blocks[rank()]
        length = max(len(b) for b in blocks)
        index = (mine + [mine[-1] if mine else 0] * length)[:length]
        batch = {c: torch.stack([stored_tensor(samples[i][c]) for i in index]) for c in columns}
        return Bucket(root.name, batch, index, len(mine), min(self.e.images, len(samples)))

    # -- the forwards -------------------------------------------------------------------------

    def _batches(self, bucket: Bucket, device, dtype):
        """(start, stop, batch on the device) over this rank's padded block, `eval.batch_size` at a time."""
        n = len(bucket.index)
        for start in range(0, n, self.e.batch_size):
            stop = min(start + self.e.batch_size, n)
            yield start, stop, {k: v[start:stop].to(device=device, dtype=dtype) for k, v in bucket.batch.items()}

    def _noise(self, purpose: str, index: list[int], bucket: str, shape) -> torch.Tensor:
        seeds = [derive_seed("eval", self.cfg.run.seed, purpose, bucket, i) for i in index]
        return initial_noise(seeds, self.channels, *shape)

    def _token_features(self, method, x0: torch.Tensor, batch: dict, noise: torch.Tensor) -> torch.Tensor:
        """(B, K, D): the teacher's tapped tokens of x0 re-noised to eval.token_t, averaged over the grid."""
        t = torch.full((x0.shape[0],), self.e.token_t, device=x0.device)
        x_t = flow.add_noise(x0, noise.to(x0), t)
        taps = method.engines.teacher.module(
            method.model_input(x_t, batch), t, batch["prompt_embeds"], batch["pooled"], taps=method.taps, velocity=False
        )
        return torch.stack([f.float().mean(dim=(2, 3)) for f in taps], dim=1).cpu()

    def _sample_set(self, method, bucket: Bucket, steps: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's own rows of the features of the student's N-step samples (`steps`) or of the
        stored teacher samples (None), by space, and the latents of the shown samples."""
        device, dtype = method.device, method.dtype
        student = method.trained_module()
        feats: dict[str, list[torch.Tensor]] = {TOKENS: []}
        if self.features is not None:
            feats[IMAGE] = []
        shown = []
        for start, stop, batch in self._batches(bucket, device, dtype):
            index = bucket.index[start:stop]
            if steps is None:
                x0 = batch["latent"]
            else:
                seeds = [derive_seed("eval", self.cfg.run.seed, "renoise", bucket.name, i) for i in index]
                noise = self._noise("student", index, bucket.name, batch["latent"].shape[-2:]).to(device, dtype)
                model = lambda x, *args, b=batch: student(method.model_input(x, b), *args)  # noqa: E731
                x0 = ladd_sample(
                    model, batch["prompt_embeds"], batch["pooled"], noise, student_schedule(steps, self.trained), seeds
                )
            token_noise = self._noise("tokens", index, bucket.name, x0.shape[-2:])
            feats[TOKENS].append(self._token_features(method, x0, batch, token_noise))
            if self.features is not None:
                feats[IMAGE].append(features_of(self.features, decode_images(self.codec, x0)))
            shown.append(x0.float().cpu())
        own = {space: torch.cat(f)[: bucket.real] for space, f in feats.items()}
        latents = torch.cat(shown)[: bucket.real]
        first = torch.tensor(bucket.index[: bucket.real]) < bucket.shown if bucket.real else torch.zeros(0, dtype=torch.bool)
        return own, latents[first]

    def _gathered(self, method, steps: int | None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Every bucket's features by space (all ranks' rows in sample order, on every rank; ALL
        pools the buckets) and the shown samples' images (on every rank)."""
        spaces: dict[str, dict[str, torch.Tensor]] = {}
        images = {}
        for bucket in self.buckets:
            own, latents = self._sample_set(method, bucket, steps)
            for space, f in own.items():
                spaces.setdefault(space, {})[bucket.name] = gather_rows(f)
            latents = gather_rows(latents)
            if self.codec is not None and len(latents):
                images[bucket.name] = decode_images(self.codec, latents.to(method.device))
        for per_bucket in spaces.values():
            per_bucket[ALL] = torch.cat([per_bucket[b.name] for b in self.buckets])
        return spaces, images

    # -- one validation -----------------------------------------------------------------------

    @torch.no_grad()
    def run(self, method) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Validate the student now: the metrics (the same on every rank) and, on every rank, the
        grids "val/<N>step/<bucket>" ((3, H, W) uint8: the teacher's samples above the student's)."""
        began = time.perf_counter()
        student = method.trained_module()
        was_training = student.training
        student.eval()
        try:
            if self.reference is None:
                self.reference, self.reference_images = self._gathered(method, None)
            fds = []  # (key, reference features, sample features)
            grids = {}
            for steps in self.steps:
                spaces, images = self._gathered(method, steps)
                for space, per_bucket in spaces.items():
                    fds.append((f"val/fd_{space}/{steps}step", self.reference[space][ALL], per_bucket[ALL]))
                    if len(self.buckets) > 1:
                        fds += [
                            (f"val/fd_{space}/{steps}step/{b.name}", self.reference[space][b.name], per_bucket[b.name])
                            for b in self.buckets
                        ]
                for name, student_images in images.items():
                    both = torch.cat([self.reference_images[name], student_images])
                    grids[f"val/{steps}step/{name}"] = torch.from_numpy(image_grid(both, rows=2)).permute(2, 0, 1)
        finally:
            student.train(was_training)
            ds.release_frozen(method.engines.teacher)
        metrics = dict(zip([key for key, _, _ in fds], shared_out_fds(fds)))
        metrics["val/seconds"] = float(all_reduce_sum(torch.tensor([time.perf_counter() - began], dtype=torch.float64))[0])
        metrics["val/seconds"] /= world_size()  # the ranks' mean
        return metrics, grids if is_main() else {}


def shared_out_fds(fds: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[float]:
    """The FD of each (key, real, fake) on every rank: rank r computes those at r, r + world, ...
    and a sum over ranks hands them to all. Token features (N, K, D): the mean of the K taps' FDs."""
    values = torch.zeros(len(fds), dtype=torch.float64)
    for i in range(rank(), len(fds), world_size()):
        _, real, fake = fds[i]
        if real.dim() == 3:
            values[i] = sum(frechet_distance(real[:, k], fake[:, k]) for k in range(real.shape[1])) / real.shape[1]
        else:
            values[i] = frechet_distance(real, fake)
    return all_reduce_sum(values).tolist()


# -- cost --------------------------------------------------------------------------------------


@dataclass
class HeldOutShape:
    samples: int  # read per bucket (eval.num_samples, or fewer where the bucket holds fewer)
    height: int  # latent
    width: int
    text_tokens: int


def held_out_shapes(cfg: Config) -> dict[str, HeldOutShape] | None:
    """Bucket -> shape of the local held-out set of eval.data; None without one."""
    if cfg.eval.data is None or is_remote(cfg.eval.data) or not Path(cfg.eval.data).exists():
        return None
    out = {}
    root = Path(cfg.eval.data)
    for d in bucket_dirs(root) or [root]:
        n = min(cfg.eval.num_samples, validate_mds_dir(d)["num_samples"])
        sample = read_samples(d, 1)[0]
        out[d.name] = HeldOutShape(n, *sample["latent"].shape[1:], sample["prompt_embeds"].shape[0])
    return out


@dataclass
class ValidationCost:
    """The FLOPs of one validation on one rank, from one-sample forwards of the meta models (the
    FLOPs of a forward are linear in its batch): the student's N-step samples of every validated
    step count and the teacher's token pass on each set; the stored samples' token pass once, at
    the first validation. The codec's decode and eval.features' encoder are not counted."""

    steps: list[int]
    per_rank: dict[str, int]  # bucket -> samples each rank runs (the longest block: padding included)
    student_forward: dict[str, float]  # bucket -> one sample's student forward
    teacher_tokens: dict[str, float]  # bucket -> one sample's teacher forward to the last tap

    @property
    def student(self) -> float:
        return sum(n * sum(self.steps) * self.student_forward[b] for b, n in self.per_rank.items())

    @property
    def teacher(self) -> float:
        return sum(n * len(self.steps) * self.teacher_tokens[b] for b, n in self.per_rank.items())

    @property
    def reference(self) -> float:
        """The first validation's extra: the token pass on the stored samples."""
        return sum(n * self.teacher_tokens[b] for b, n in self.per_rank.items())

    @property
    def round(self) -> float:
        return self.student + self.teacher


def validation_cost(cfg: Config, models: dict, taps: list[int], shapes: dict[str, HeldOutShape], world: int) -> ValidationCost:
    """`models`: the meta teacher and student (as the engines hold them); `shapes`: the held-out
    buckets (held_out_shapes, or the plan's training shape)."""
    from ladd_ds.models.activations import RecomputeFlops  # the step plan's FLOP counter

    teacher, student = models["teacher"], models["student"]
    tc = teacher.transformer.config
    dtype = next(student.parameters()).dtype
    cost = ValidationCost(validated_steps(cfg), {}, {}, {})
    for name, shape in shapes.items():
        cost.per_rank[name] = -(-shape.samples // world)
        with torch.device("meta"):
            x = torch.randn(1, tc.in_channels, shape.height, shape.width, dtype=dtype)
            t = torch.rand(1)
            embeds = torch.randn(1, shape.text_tokens, tc.joint_attention_dim, dtype=dtype)
            pooled = torch.randn(1, tc.pooled_projection_dim, dtype=dtype)
        with torch.no_grad():
            with RecomputeFlops() as counted:
                student(x, t, embeds, pooled)
            cost.student_forward[name] = float(counted.total)
            with RecomputeFlops() as counted:
                teacher(x, t, embeds, pooled, taps=taps, velocity=False)
            cost.teacher_tokens[name] = float(counted.total)
    return cost


def cost_lines(cfg: Config, cost: ValidationCost, step_flops: float, where: str) -> list[str]:
    """The --dry-run's validation lines: FLOPs per validation and their share of the compute
    between two validations (`step_flops`: one optimizer step on one rank)."""
    every = cfg.eval.every or EvalConfig.every  # off: costed at the default
    between = every * step_flops
    share = cost.round / (between + cost.round) if between + cost.round else 0.0
    state = "on" if cfg.eval.enabled else f"off: eval.data null, costed for {where}"
    return [
        f"validation ({state}): eval.every {every}, {sum(cost.per_rank.values())} samples per rank of "
        f"{len(cost.per_rank)} bucket(s), student steps {cost.steps}",
        f"  per validation and rank: {tflop(cost.round)} (student sampling {tflop(cost.student)}, teacher token "
        f"features {tflop(cost.teacher)}; the first adds {tflop(cost.reference)} for the stored samples); "
        "decode and eval.features not counted",
        f"  a training step: {tflop(step_flops)} per rank; validation is {share:.2%} of the compute at eval.every {every}",
    ]


def tflop(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP"

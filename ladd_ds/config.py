"""Typed run configuration: YAML -> one dataclass per component.

Unknown keys, wrong types and impossible combinations are rejected at load time with the
full key path (``ladd.renoise_s``) in the message, before any model or engine is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ladd_ds.core.errors import LaddError


class ConfigError(LaddError, ValueError):
    """A run config that cannot be used; the message names the file and key."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ConfigError("run.max_steps: must be >= 0")


@dataclass
class ModelConfig:
    # A preset name from ladd_ds.models.registry or a local diffusers folder (with transformer/).
    teacher: str = "tiny"
    # None: the student starts as a copy of the teacher's weights (LADD default).
    student: str | None = None
    # A preset name as model.student gives a randomly initialised student; that must be asked for.
    random_init_student: bool = False
    # Recompute block activations in backward instead of storing them (saves memory, costs a
    # forward of the checkpointed blocks: --dry-run prints both). true / false: every block of the
    # student and the teacher / none; a policy for both ("all", "none", "every:K": blocks 0, K,
    # 2K, ...), or one per engine, e.g. {student: all, teacher: "every:2"} (an engine left out:
    # none). DPO's trained model follows `student`; its reference runs without gradients.
    gradient_checkpointing: bool | str | dict[str, bool | str] = False
    # torch.compile every transformer block of teacher and student in place (one static-shape
    # graph per block kind, grad mode and bucket shape). Needs their engines below ZeRO-3
    # (deepspeed.student_config, deepspeed.teacher_config); on a CPU, a C++ compiler.
    compile: bool = False
    # Scaled-dot-product-attention kernel put first (models/attention.py): default (torch's own
    # order), flash, cudnn, efficient (GPU kernels: a CPU run warns and uses the default) or math.
    attention_backend: Literal["default", "flash", "cudnn", "efficient", "math"] = "default"

    def validate(self) -> None:
        for engine in CHECKPOINTED_ENGINES:
            self.checkpoint_every(engine)

    def checkpoint_every(self, engine: str) -> int:
        """model.gradient_checkpointing for `engine` ("student" or "teacher") as a block stride:
        0 checkpoints no block, K every K-th block (0, K, 2K, ...), 1 every block."""
        policy, key = self.gradient_checkpointing, "model.gradient_checkpointing"
        if isinstance(policy, dict):
            unknown = sorted(set(policy) - set(CHECKPOINTED_ENGINES))
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: unknown engine (known: {', '.join(CHECKPOINTED_ENGINES)})")
            policy, key = policy.get(engine, "none"), f"{key}.{engine}"
        return checkpoint_stride(policy, key)


CHECKPOINTED_ENGINES = ("student", "teacher")


def checkpoint_stride(policy: bool | str, key: str) -> int:
    """A checkpointing policy (true, false, "all", "none", "every:K") as a block stride (0: none)."""
    if isinstance(policy, bool):
        return int(policy)
    if policy in ("all", "none"):
        return int(policy == "all")
    match = re.fullmatch(r"every:(\d+)", policy.strip())
    if match is None or int(match[1]) < 1:
        raise ConfigError(f"{key}: {policy!r} is not all, none, every:K (K >= 1: blocks 0, K, 2K, ...), true or false")
    return int(match[1])


@dataclass
class DiscriminatorConfig:
    # Teacher blocks whose image tokens feed a head; None = every block (paper default).
    taps: list[int] | None = None
    hidden_channels: int = 64
    num_layers: int = 2  # conv layers per head before the logit

    def validate(self) -> None:
        taps = self.taps
        if taps is not None and (not taps or len(set(taps)) != len(taps) or min(taps) < 0):
            raise ConfigError("discriminator.taps: distinct block indices >= 0, or null for all blocks")


@dataclass
class LADDConfig:
    # What the student learns (docs/method.md, section 8): text-to-image, or an image-conditioned
    # variant whose transformers take the condition as extra input channels. model.teacher must be
    # a model of the task (a widened text-to-image teacher, frozen, would ignore the condition);
    # a text-to-image model.student is widened with zero weights for them. The data must be of
    # the task's layout: `ladd-ds encode --task` / `ladd-ds synth --task`.
    task: Literal["t2i", "inpaint", "edit"] = "t2i"
    # Student timesteps and their probabilities (paper: {1, .75, .5, .25} with .7/.1/.1/.1).
    student_timesteps: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    student_probs: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.1, 0.1])
    # Probabilities used during the first `warmup_steps` steps (paper, high resolution:
    # ~500 iterations of [0, 0, .5, .5]); None = no warm-up phase.
    warmup_probs: list[float] | None = None
    warmup_steps: int = 0
    # Re-noising for the discriminator: t_hat = sigmoid(m + s * n), n ~ N(0, 1).
    renoise_m: float = 1.0
    renoise_s: float = 1.0
    r1_gamma: float = 0.0  # R1 penalty on head inputs (0 = off)
    distill_weight: float = 0.0  # teacher x0 on the re-noised student output (0 = off)
    # Guidance scale of that target: the teacher's x0 with classifier-free guidance,
    # v = v(empty prompt) + w (v(prompt) - v(empty prompt)). None: the scale the data was generated
    # with (synth.guidance_scale recorded in data.path's manifest.json; 1 for encoded real images).
    distill_cfg: float | None = None
    # True: the D step reuses the G step's fakes; False: recompute them with the updated student.
    reuse_fakes: bool = True

    def validate(self) -> None:
        n = len(self.student_timesteps)
        if n == 0:
            raise ConfigError("ladd.student_timesteps: must not be empty")
        if any(not 0.0 < t <= 1.0 for t in self.student_timesteps):
            raise ConfigError("ladd.student_timesteps: every timestep must be in (0, 1]")
        for key in ("student_probs", "warmup_probs"):
            probs = getattr(self, key)
            if probs is None:
                continue
            if len(probs) != n:
                raise ConfigError(f"ladd.{key}: has {len(probs)} entries, ladd.student_timesteps has {n}")
            if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ConfigError(f"ladd.{key}: probabilities must be >= 0 and sum to 1, got {probs}")
        if self.warmup_steps > 0 and self.warmup_probs is None:
            raise ConfigError("ladd.warmup_steps > 0 needs ladd.warmup_probs")
        if self.renoise_s <= 0:
            raise ConfigError("ladd.renoise_s: must be > 0")
        if self.r1_gamma < 0 or self.distill_weight < 0:
            raise ConfigError("ladd.r1_gamma and ladd.distill_weight must be >= 0")
        if self.distill_cfg is not None and self.distill_cfg < 1:
            raise ConfigError(f"ladd.distill_cfg must be >= 1 (1 = no guidance) or null, got {self.distill_cfg}")


@dataclass
class RandomLatentsConfig:
    """Built-in source of random latents, written once as MDS shards (for tests and smoke runs)."""

    num_samples: int = 64
    latent_channels: int = 4
    height: int = 16
    width: int = 16
    text_len: int = 8  # tokens of prompt_embeds (the same for every sample, as in real data)
    text_dim: int = 32
    pooled_dim: int = 16

    def validate(self) -> None:
        if self.text_len < 1:
            raise ConfigError("data.random_latents.text_len must be at least 1")


def check_compression(compression: str | None, key: str = "compression") -> None:
    """Refuse a shard compression streaming cannot write (naming `key`): None, or a codec of
    streaming with an optional level, e.g. 'zstd' or 'zstd:7'."""
    from streaming.base.compression import get_compressions  # keeps `ladd-ds --help` fast (the CLI imports this module)

    if compression is not None and compression not in get_compressions():
        codecs = sorted({c.split(":")[0] for c in get_compressions()})
        raise ConfigError(f"{key}: {compression!r} is not one of {codecs} (optionally with a level, 'zstd:7') or null (none).")


@dataclass
class DataConfig:
    # "mds": read shards from `path`; "random_latents": write random shards to RUN_DIR/data first.
    source: Literal["mds", "random_latents"] = "mds"
    path: str | None = None  # local directory, multi-bucket root, or object-store URL
    cache_dir: str | None = None  # local copy of the shards (required for a remote path)
    buckets: list[str] | None = None  # bucket subdirectories of a remote multi-bucket root
    compression: str | None = None  # of the shards synth/encode/pairs write: "zstd", "zstd:7", ...; null = none
    micro_batch_size: int = 4
    num_workers: int = 0
    # Leave out (with a warning) the buckets of a local multi-bucket root that hold fewer samples
    # than one global batch, instead of stopping: every batch comes from one bucket.
    drop_small_buckets: bool = False
    # Shared memory of ended streaming jobs removed at start: "stale" = only blocks no process on
    # the node uses; "all" = every streaming block (also a live job's: a node to yourself); "off".
    shared_memory_cleanup: Literal["stale", "all", "off"] = "stale"
    # `ladd-ds encode` skips (and lists with the reason) an image whose shorter side is below
    # min_image_side pixels or whose long side / short side is beyond max_aspect_ratio, from its
    # header. null: from synth.buckets. Half the smallest bucket side: an image enlarged more than
    # 2x to cover its bucket is mostly interpolation (a 1x1 image would fill a 128x128 bucket with
    # one colour). Twice the most elongated bucket's ratio: the center crop to the nearest bucket
    # (of the image's orientation) then keeps at least half of the image (a 20000x20 strip would
    # keep 0.15% of it in a 1.5:1 bucket).
    min_image_side: int | None = None
    max_aspect_ratio: float | None = None
    random_latents: RandomLatentsConfig = field(default_factory=RandomLatentsConfig)

    def validate(self) -> None:
        if self.source == "mds" and not self.path:
            raise ConfigError("data.path: required when data.source is 'mds' (a directory of MDS shards)")
        if self.micro_batch_size < 1:
            raise ConfigError("data.micro_batch_size: must be >= 1")
        if self.min_image_side is not None and self.min_image_side < 1:
            raise ConfigError("data.min_image_side: must be >= 1 (pixels), or null for half the smallest bucket side")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1.0:
            raise ConfigError("data.max_aspect_ratio: must be >= 1 (long side / short side), or null to derive it from buckets")
        check_compression(self.compression, "data.compression")


@dataclass
class OptimConfig:
    student_lr: float = 1e-5
    heads_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear LR warm-up, in optimizer steps
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    ema_decay: float = 0.0  # EMA of the student's weights (0 = off)
    # Update the EMA after every k-th optimizer step (its horizon is then about k / (1 - decay)
    # steps): each update reads every trained parameter once, which at 8B is a pass over 32 GB.
    ema_every: int = 1

    def validate(self) -> None:
        # Checked here, not left to torch: a negative rate passes DeepSpeed's engine set-up and
        # fails in the optimizer's constructor after every model is built. A rate of 0 is allowed:
        # it keeps that model as it is (e.g. to check loading, tests/test_multirank.py).
        for key in ("student_lr", "heads_lr"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps: must be > 0, got {self.eps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers [beta1, beta2], each in [0, 1), got {self.betas}")
        for key in ("weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if self.grad_accum < 1:
            raise ConfigError("optim.grad_accum: must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("optim.ema_decay: must be in [0, 1)")
        if self.ema_every < 1:
            raise ConfigError(f"optim.ema_every: must be >= 1 (update the EMA every k steps), got {self.ema_every}")


@dataclass
class InterconnectConfig:
    """Bandwidth per GPU (Gbit/s) within a node and between nodes, and GPUs per node: what the
    communication plan times collectives with (ladd_ds/training/comms_plan.py)."""

    intra_node_gbps: float = 3600.0  # NVLink 4: ~450 GB/s per GPU
    inter_node_gbps: float = 400.0  # one 400 Gb/s NIC per GPU
    gpus_per_node: int = 8

    def validate(self) -> None:
        if self.intra_node_gbps <= 0 or self.inter_node_gbps <= 0 or self.gpus_per_node < 1:
            raise ConfigError("deepspeed.interconnect: bandwidths must be > 0 (Gbit/s) and gpus_per_node >= 1")


@dataclass
class DeepSpeedConfig:
    # JSON templates; relative paths are resolved against the repository root.
    student_config: str = "ds_configs/cpu/zero3.json"
    teacher_config: str = "ds_configs/cpu/zero3_frozen.json"
    heads_config: str = "ds_configs/cpu/zero2.json"
    # ZeRO stage per engine, overriding the template's: null keeps the template's; "auto" picks it
    # from the memory plan (docs/performance.md, "Placement"). The teacher is frozen: 0 or 3.
    student_stage: Literal["auto", 0, 1, 2, 3] | None = None
    teacher_stage: Literal["auto", 0, 3] | None = None
    heads_stage: Literal["auto", 0, 1, 2, 3] | None = None
    # Memory per device for "auto" (GiB); null: the GPU's, or the host's divided by the ranks per node.
    device_memory_gib: float | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    dist_backend: str | None = None  # None: nccl on GPU, gloo on CPU
    # LADD's ZeRO-3 student and teacher gather each transformer block's weights in one coalesced
    # all-gather (the block a DeepSpeed "leaf module") instead of one per submodule
    # (docs/performance.md, "ZeRO-3 gathers"; DPO's engines do not use it yet).
    z3_leaf_blocks: bool = False
    # With an interconnect, --dry-run estimates communication and step time, and "auto" picks the
    # fastest placement that fits (docs/performance.md, "Communication"); null: memory only.
    interconnect: InterconnectConfig | None = None
    # Achieved TFLOP/s per GPU assumed for the compute time: a plain PyTorch LADD step on one H200
    # ran 242.6 TFLOP in 881.8 ms (docs/performance.md, "Step benchmark"), 275 TFLOP/s.
    achieved_tflops: float = 275.0

    def validate(self) -> None:
        if self.device_memory_gib is not None and self.device_memory_gib <= 0:
            raise ConfigError(f"deepspeed.device_memory_gib: must be > 0 (GiB), got {self.device_memory_gib}")
        if self.achieved_tflops <= 0:
            raise ConfigError(f"deepspeed.achieved_tflops: must be > 0, got {self.achieved_tflops}")
        if self.interconnect is not None:
            self.interconnect.validate()


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # Student sample grids in TensorBoard every N steps (0 = off), one row per prompt; needs the
    # text encoders and the latent codec of the text and codec sections.
    sample_every: int = 0
    sample_prompts: list[str] | None = None

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("logging.every: must be >= 1")
        if self.sample_every < 0:
            raise ConfigError("logging.sample_every: must be >= 0 (0 = no sample grids)")
        if self.sample_every > 0 and not self.sample_prompts:
            raise ConfigError("logging.sample_prompts: give at least one prompt when logging.sample_every > 0")


@dataclass
class EvalConfig:
    """Validation during training (docs/evaluation.md, "During training"): every `every` steps the
    student samples the held-out prompts of `data` at each of `steps` and is measured against the
    teacher's samples stored there, by FD in the teacher's own token-feature space (no extra
    weights) and, with `features`, in an image encoder's."""

    every: int = 500  # steps between validations (and at the last step); 0 = off
    at_start: bool = True  # also before the first step: the starting student's numbers
    data: str | None = None  # a local `ladd-ds synth` dataset of prompts held out of training; null = off
    num_samples: int = 64  # per bucket: its first N samples
    steps: list[int] | None = None  # student step counts; null = those of 1, 2, 4 the run trains
    token_t: float = 0.5  # the noise level at which the teacher reads both sample sets for the token FD
    features: str | None = None  # an Inception-v3 weights file or a transformers image-encoder folder
    batch_size: int = 8
    images: int = 8  # samples of each bucket shown in TensorBoard (teacher row, student row); 0 = none

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.data is not None

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError("eval.every: must be >= 0 (0 = no validation)")
        if self.num_samples < 2:
            raise ConfigError(f"eval.num_samples: an FD needs at least 2 samples per bucket, got {self.num_samples}")
        if self.steps is not None and (not self.steps or min(self.steps) < 1):
            raise ConfigError(f"eval.steps: give step counts >= 1 (or null for the trained ones), got {self.steps}")
        if not 0.0 < self.token_t < 1.0:
            raise ConfigError(f"eval.token_t: a noise level in (0, 1), got {self.token_t}")
        if self.batch_size < 1 or self.images < 0:
            raise ConfigError("eval.batch_size must be >= 1 and eval.images >= 0")


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 2

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("checkpoint.every: must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last: must be >= 1 (resume needs a checkpoint)")


@dataclass
class TextConfig:
    """The text conditioning: what synth, encode and pairs store with every sample, and what the
    training previews and the exported student's sampling encode prompts with."""

    encoders: str = "tiny"  # "tiny" (built in code for model.teacher's preset) or a local SD3 folder
    drop_t5: bool = False
    # T5 tokens of the conditioning (diffusers' max_sequence_length): SD3 uses 256; 77 stores
    # and attends to 54% fewer text tokens (77 + 77 instead of 77 + 256; docs/data.md, "Text conditioning").
    max_sequence_length: int = 256
    seed: int = 0  # initial weights of the "tiny" encoders (a folder's encoders are loaded)

    def validate(self) -> None:
        if self.max_sequence_length < 0:
            raise ConfigError("text.max_sequence_length: must be >= 0 (0: no T5 tokens)")


@dataclass
class CodecConfig:
    """The latent codec between pixels and the transformer's latents (encode, pairs, previews,
    sampling)."""

    # "tiny" (a small VAE built in code), "pixel-unshuffle" (the demo's invertible codec) or a
    # local SD3 folder with vae/.
    vae: str = "tiny"
    seed: int = 0  # initial weights of the "tiny" VAE


@dataclass
class SynthConfig:
    """`ladd-ds synth`: the teacher (model.teacher) generates training latents from prompts."""

    prompts: str | None = None  # text file (one prompt per line) or JSONL (prompt, bucket, seed)
    out: str = "data/synthetic"
    buckets: list[list[int]] = field(default_factory=lambda: [[128, 128]])  # [height, width] in pixels
    bucket_weights: list[float] | None = None  # for prompts without a bucket; None = uniform
    guidance_scale: float = 5.0
    num_steps: int = 28
    shift: float = 3.0  # schedule shift of the released SD3 models
    batch_size: int = 4
    seed: int = 0  # bucket draws and per-prompt noise seeds (JSONL 'seed' overrides)
    part_size: int = 256  # samples per crash-safe part
    zero_stage: Literal[0, 3] = 0  # 0: teacher replicated on every rank; 3: partitioned (ZeRO-3)
    images: str | None = None  # `ladd-ds encode`: image folder
    captions: str | None = None  # `ladd-ds encode`: JSONL {"file", "caption"} or "file<TAB>caption" lines

    def validate(self) -> None:
        if self.bucket_weights is not None and len(self.bucket_weights) != len(self.buckets):
            raise ConfigError(f"synth.bucket_weights: {len(self.bucket_weights)} weights for {len(self.buckets)} synth.buckets")
        if self.batch_size < 1 or self.part_size < 1 or self.num_steps < 1:
            raise ConfigError("synth.batch_size, synth.part_size and synth.num_steps must be >= 1")


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (adapter scale 1)
    # Module name suffixes inside the transformer blocks; None = every attention projection of
    # both streams (ladd_ds.models.lora.ATTENTION_TARGETS).
    targets: list[str] | None = None
    mlp: bool = False  # also adapt the feed-forward layers
    dropout: float = 0.0

    def validate(self) -> None:
        if self.rank < 1 or (self.alpha is not None and self.alpha <= 0) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dpo.lora: rank >= 1, alpha > 0 (or null) and 0 <= dropout < 1")
        if self.targets is not None and not self.targets:
            raise ConfigError("dpo.lora.targets: name at least one module, or null for every attention projection")


@dataclass
class DPOConfig:
    """`ladd-ds dpo`: Diffusion-DPO of model.teacher on preference pairs at data.path."""

    # "lora": train LoRA adapters, the reference is the same weights with adapters off;
    # "full": train every weight, the reference is a frozen copy (deepspeed.teacher_config).
    mode: Literal["lora", "full"] = "lora"
    # Scale of the implicit reward. Epsilon-prediction values (2500-5000) do not transfer to
    # velocity errors; tune it per model and data (docs/method.md, section 5).
    beta: float = 1000.0
    lr: float = 1e-4
    # Training-time t = shift(sigmoid(t_mean + t_std * n)), shift(t) = s t / (1 + (s - 1) t) with
    # s = time_shift: SD3's training density, logit-normal(0, 1) shifted as its sampler (s = 3 at
    # 1024 px). null: model.teacher's sampling shift (ladd_ds.models.scheduler); 1: unshifted.
    t_mean: float = 0.0
    t_std: float = 1.0
    time_shift: float | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        for key in ("beta", "lr", "t_std"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"dpo.{key}: must be > 0, got {getattr(self, key)}")
        if self.time_shift is not None and not self.time_shift > 0:
            raise ConfigError(f"dpo.time_shift: must be > 0 (or null for model.teacher's sampling shift), got {self.time_shift}")


@dataclass
class PairsConfig:
    """`ladd-ds pairs`: sample K images per prompt from a model, rank them with a scorer and keep
    the best and the worst as a preference pair."""

    model: str | None = None  # what `ladd-ds sample --model` takes; None = model.teacher
    prompts: str | None = None  # text file, one prompt per line
    out: str = "data/pairs"
    samples_per_prompt: int = 4  # K
    steps: int = 28
    guidance_scale: float = 5.0
    shift: float | None = None  # schedule shift of the sampler; None = the model's own (ladd-ds sample's)
    height: int = 128  # pixels
    width: int = 128
    # [[height, width], ...]: several resolutions (a prompt file's JSONL lines may name their
    # "bucket"; imported pairs take the one nearest the winner's aspect ratio); None = height x width
    buckets: list[list[int]] | None = None
    batch_size: int = 16  # images per sampling call (batch_size // samples_per_prompt prompts), or pairs per encode call
    part_size: int = 256  # pairs per committed part: what a crash can lose, and what is held in memory
    seed: int = 0
    # "package.module:callable" building the scorer, called with `scorer_args` as keyword
    # arguments; the scorer maps (images (N, 3, H, W) in [0, 1], prompts) to N scores, higher
    # is better (ladd_ds.generate.pairs.Scorer).
    scorer: str | None = None
    scorer_args: dict[str, Any] = field(default_factory=dict)
    # Pairs whose scores differ by less than this are dropped (no clear preference).
    min_score_gap: float = 0.0

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError("pairs.samples_per_prompt: need at least 2 samples to make a pair")
        if self.steps < 1 or self.batch_size < 1 or self.part_size < 1 or self.min_score_gap < 0:
            raise ConfigError("pairs.steps, pairs.batch_size and pairs.part_size must be >= 1, pairs.min_score_gap >= 0")
        if self.buckets is not None and (not self.buckets or any(len(b) != 2 or min(b) <= 0 for b in self.buckets)):
            raise ConfigError("pairs.buckets: a list of [height, width] in pixels, or null for pairs.height x pairs.width")
        if self.scorer is not None and ":" not in self.scorer:
            raise ConfigError(f"pairs.scorer: {self.scorer!r} should read 'package.module:callable'")


@dataclass
class HealthConfig:
    # A step whose loss or gradient norm is not finite on any rank is skipped on every rank
    # (DeepSpeed's overflow check); after this many skips in a row the run saves and stops.
    max_consecutive_skips: int = 10
    # Collective operations that wait longer than this (e.g. for a rank that died) end the job.
    collective_timeout_s: float = 1800.0

    def validate(self) -> None:
        if self.max_consecutive_skips < 1 or self.collective_timeout_s <= 0:
            raise ConfigError("health.max_consecutive_skips must be >= 1 and health.collective_timeout_s > 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    ladd: LADDConfig = field(default_factory=LADDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    text: TextConfig = field(default_factory=TextConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)

    def validate(self) -> None:
        """Every section checks its own keys (its `validate`, nested sections included), then the
        rules across sections."""
        from ladd_ds.models.registry import PRESETS  # imports torch: kept out of `ladd-ds --help` (the CLI imports this module)

        def sections(obj):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    yield from sections(value)
                    yield value

        for section in sections(self):
            if hasattr(section, "validate"):
                section.validate()

        if self.model.student in PRESETS and not self.model.random_init_student:
            raise ConfigError(
                f"model.student = {self.model.student!r} is a size preset: the student would start from random weights. "
                "Pass a local diffusers SD3 folder (e.g. a smaller pretrained model), leave model.student null to start "
                "from a copy of the teacher, or set model.random_init_student: true to train a random one"
            )

    def check_command(self, command: str) -> None:
        """Rules of one command's use of the config (`ladd-ds dpo` trains on pairs, without EMA)."""
        if command == "dpo":
            if self.data.source != "mds":
                raise ConfigError(
                    "data.source: `ladd-ds dpo` reads preference pairs (data.source: mds, written by `ladd-ds pairs`)"
                )
            if self.optim.ema_decay > 0:
                raise ConfigError("optim.ema_decay: DPO keeps no EMA; set it to 0")
            if self.eval.data is not None:
                raise ConfigError(
                    "eval.data: validation during training is LADD's; `ladd-ds dpo` does not run it, set it to null"
                )


# ---------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping with string keys, got {value!r}")
        return {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _to_dataclass(value, tp, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "5e-5" (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


# Keys of earlier versions: what to do instead.
RETIRED_KEYS = {
    "synth.max_t5_tokens": "renamed to text.max_sequence_length",
    "synth.max_sequence_length": "moved to text.max_sequence_length (the text section)",
    "synth.text_encoders": "moved to text.encoders (the text section)",
    "synth.drop_t5": "moved to text.drop_t5 (the text section)",
    "synth.vae": "moved to codec.vae (the codec section)",
    "data.text_len": "removed: every prompt now has the same text length (SD3's full conditioning), nothing is padded",
    "data.random_latents.text_len_min": "replaced by data.random_latents.text_len (one length for all samples)",
    "data.random_latents.text_len_max": "replaced by data.random_latents.text_len (one length for all samples)",
}


def _to_dataclass(data: dict, cls: type, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            if where in RETIRED_KEYS:
                raise ConfigError(f"{where}: {RETIRED_KEYS[where]}")
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _apply_override(raw: dict, override: str, label: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML. `label`: how the
    user gave it (``--set KEY=VALUE``, or a flag such as ``--max-steps 5``), for errors."""
    if "=" not in override:
        raise ConfigError(f"{label}: expected section.key=value, e.g. --set optim.student_lr=1e-5")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{label}: {key.strip()!r} is not a key path; expected section.key=value")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"{label}: {section} is not a section (it holds {node!r}); set {section}=VALUE itself")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: the value is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what, and where (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = f" ({e.context})" if getattr(e, "context", None) else ""
    return f"{getattr(e, 'problem', None) or ' '.join(str(e).split())}{where}{context}"


def _override_of(message: str, overrides: dict[str, str]) -> str | None:
    """The label of the override whose key the error message names (the last such override wins,
    as its value is the one that was used), or None: the error is the config file's."""
    found = None
    for override, label in overrides.items():
        parts = override.split("=", 1)[0].strip().split(".")
        key = ".".join(parts)
        # The key itself or one under it (`--set optim={...}` -> "optim.student_lr: ..."), or the
        # key that a deeper --set turned into a section ("optim.betas: expected a list").
        named = [key, *(".".join(parts[:i]) for i in range(2, len(parts)))]
        if any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message) for k in named):
            found = label
    return found


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    command: str | None = None,
    labels: dict[str, str] | None = None,
) -> Config:
    """Load a YAML run config, apply ``--set`` overrides, type-check and validate it (every
    section, the rules across sections, and `command`'s own rules when given). An error is
    attributed to the override that set the key it names (``--set optim.grad_accum=0: ...``, or
    its entry in `labels`: override -> how the user gave it, e.g. ``--max-steps -1``), else to the
    file."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config FILE, e.g. configs/tiny_cpu.yaml)")
        try:
            raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}; fix it there") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    given = {o: (labels or {}).get(o, f"--set {o}") for o in overrides}
    for override, label in given.items():
        _apply_override(raw, override, label)
    try:
        cfg = _to_dataclass(raw, Config, "")
        cfg.validate()
        if command is not None:
            cfg.check_command(command)
    except ConfigError as e:
        label = _override_of(str(e), given)
        raise ConfigError(f"{label or path or '<defaults>'}: {e}") from None
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

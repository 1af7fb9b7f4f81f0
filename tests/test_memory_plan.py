"""The memory plan's step terms against what a real CPU step does: the bytes autograd saves in a
LADD generator step and discriminator step (per model, checkpointing policies, frozen teacher),
the recompute FLOPs of checkpointing, and the temporaries of torch AdamW's step."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ladd_ds.config import ConfigError, load_config
from ladd_ds.ladd.build import build_models, step_activations
from ladd_ds.models.activations import block_activation_bytes, fused_attention
from ladd_ds.models.registry import build_transformer
from ladd_ds.training.placement import EngineNeeds, adamw_temporaries, engine_memory, optimizer_steps
from tests.conftest import TINY_CONFIG

STAGES = [f"deepspeed.{k}_stage=0" for k in ("student", "teacher", "heads")]  # plain parameters: no ZeRO-3 gathers


def layer_norm_stats(t: torch.Tensor) -> bool:
    """A bf16 layer norm's saved mean or rstd, (B, S, 1): kept in bf16 by the CPU kernel, in fp32
    (the op's math type) by the CUDA kernel and by the meta kernel the plan counts with."""
    return t.dtype == torch.bfloat16 and t.dim() == 3 and t.shape[-1] == 1


class SavedBytes:
    """The oracle: bytes autograd saves while active, once per storage (by address; the storages
    are kept alive so an address is never reused), parameters excluded, by the model whose forward
    is running; bf16 layer-norm statistics at their CUDA size (`layer_norm_stats`)."""

    def __init__(self, models: dict):
        self.params = {p.untyped_storage().data_ptr() for m in models.values() for p in m.parameters()}
        self.models, self.owner, self.kept = models, "other", {}
        self.bytes = dict.fromkeys([*models, "other"], 0)
        self.upcast = 0  # layer-norm statistics counted at fp32

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params and storage.data_ptr() not in self.kept:
            self.kept[storage.data_ptr()] = storage
            upcast = layer_norm_stats(t) and storage.nbytes() == t.numel() * 2
            self.upcast += upcast
            self.bytes[self.owner] += storage.nbytes() * (2 if upcast else 1)
        return t

    def __enter__(self):
        self.handles = []
        for name, m in self.models.items():
            self.handles.append(m.register_forward_pre_hook(lambda *_, name=name: setattr(self, "owner", name)))
            self.handles.append(m.register_forward_hook(lambda *_: setattr(self, "owner", "other")))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()


POLICIES = {  # model.gradient_checkpointing -> (student's, teacher's block stride); the first checkpoints none
    "false": (0, 0),
    "true": (1, 1),
    "{student: 'every:2', teacher: none}": (2, 0),
    "{student: none, teacher: 'every:2'}": (0, 2),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plans_step_activations_are_what_a_real_step_saves(tmp_path, distributed_world_of_one, precision):
    """A real G step and D step of the tiny LADD run on one rank (engines at ZeRO-0), for several
    checkpointing policies: the bytes autograd saves, per model, are the plan's, exactly (both count
    the same tensors: the plan runs the same step code on meta tensors; attention is the fused
    kernel's memory in both, `fused_attention`, as the CPU's math kernel would save its S x S
    probabilities). The FLOPs checkpointing adds are the real step's too."""
    from tests.test_ladd_steps import make_trainer

    trainer = make_trainer(tmp_path / "run", f"deepspeed.precision={precision}", *STAGES)
    method, e = trainer.method, trainer.method.engines
    models = {"student": e.student.module, "teacher": e.teacher.module, "heads": e.heads.module}
    batch = method.to_device(next(trainer.batches))
    noise = method.draw_noise(batch)
    seen, flops = {}, {}
    for policy, (student_every, teacher_every) in POLICIES.items():
        cfg = load_config(TINY_CONFIG, [f"deepspeed.precision={precision}", f"model.gradient_checkpointing={policy}"])
        teacher, student, heads, _ = build_models(cfg, device="meta")
        checkpointed = student_every + teacher_every > 0
        planned = step_activations(cfg, {"teacher": teacher, "student": student, "heads": heads}, flops=checkpointed)
        assert (student.checkpoint_stride, teacher.checkpoint_stride) == (student_every, teacher_every)
        e.student.module.set_checkpointing(student_every)
        e.teacher.module.set_checkpointing(teacher_every)
        with fused_attention(), FlopCounterMode(display=False) as counter:
            with SavedBytes(models) as g:
                _, fakes = method.generator_step(batch, noise)
            with SavedBytes(models) as d:
                method.discriminator_step(batch, noise, fakes)
        flops[policy] = counter.get_total_flops()
        assert planned.kept == {"G step": g.bytes, "D step": d.bytes}, policy
        assert (g.upcast > 0) == (precision == "bf16")  # the correction is exercised in bf16
        # The real step without checkpointing ran first (POLICIES' first entry).
        assert planned.recompute_flops == pytest.approx(flops[policy] / flops["false"] - 1, abs=1e-12)
        assert (planned.recompute_flops > 0) == checkpointed
        seen[policy] = planned
    trainer.close()
    # What the policies change: a checkpointed model keeps less, the other one the same.
    full, student_ckpt = seen["false"].kept["G step"], seen["{student: 'every:2', teacher: none}"].kept["G step"]
    assert student_ckpt["student"] < full["student"] and student_ckpt["teacher"] == full["teacher"]
    teacher_ckpt = seen["{student: none, teacher: 'every:2'}"].kept["G step"]
    assert seen["true"].kept["G step"]["teacher"] < teacher_ckpt["teacher"] < full["teacher"]
    assert seen["false"].recompute["G step"] == 0 < seen["true"].recompute["G step"]
    # The frozen teacher keeps less than it would if it trained (no weight-gradient saves).
    cfg = load_config(TINY_CONFIG, [f"deepspeed.precision={precision}"])
    teacher = build_models(cfg, device="meta")[0]
    block = teacher.transformer.transformer_blocks[0]
    shapes = {"batch": 4, "image_tokens": 64, "text_tokens": 8, "width": teacher.feature_dim, "dtype": torch.float32}
    as_trained = block_activation_bytes(block.requires_grad_(True), **shapes)
    as_frozen = block_activation_bytes(block.requires_grad_(False), **shapes)
    assert as_frozen.saved < as_trained.saved


@pytest.mark.parametrize("trained", [True, False])
def test_block_recompute_term_is_a_real_blocks_saved_bytes(trained):
    """The recompute term (one checkpointed block's saved bytes, trained or frozen) is what a real
    forward of that block saves in fp32 and bf16 (inputs as inside a step: image and text tokens
    need gradients, the time embedding only in a trained model)."""
    for dtype in (torch.float32, torch.bfloat16):
        block = build_transformer("tiny", seed=0).transformer_blocks[0].to(dtype).requires_grad_(trained)
        width = block.norm1.linear.in_features
        with torch.device("meta"):
            meta_block = build_transformer("tiny", seed=0, device="meta").transformer_blocks[0].requires_grad_(trained)
        planned = block_activation_bytes(meta_block, batch=2, image_tokens=16, text_tokens=8, width=width, dtype=dtype)
        inputs = [torch.randn(*shape, dtype=dtype).requires_grad_() for shape in ((2, 16, width), (2, 8, width))]
        inputs.append(torch.randn(2, width, dtype=dtype).requires_grad_(trained))
        with fused_attention(), SavedBytes({"block": block}) as saved:
            block(hidden_states=inputs[0], encoder_hidden_states=inputs[1], temb=inputs[2])
        assert planned.saved == saved.bytes["block"] > 0
        assert (saved.upcast > 0) == (dtype == torch.bfloat16)
        assert planned.inputs == sum(x.numel() * x.element_size() for x in inputs)


class AllocationPeak(TorchDispatchMode):
    """The peak of bytes allocated by ops while active and still referenced (new storages only:
    in-place results and views of existing tensors are not allocations)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        # The allocator may hand the same address out again: a freed storage's key is forgotten.
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in inputs or key in self.seen:
                    continue
                self.seen.add(key)
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, key, n)
        return out


@pytest.mark.parametrize("kind", ["for-loop", "foreach", "fused"])
def test_the_plans_optimizer_temporaries_are_what_adamw_allocates(kind):
    """The plan's optimizer temporaries for each AdamW implementation: the allocation peak of a real
    step over the tiny student's parameters (ZeRO-0: each parameter; fp32 and bf16 state) and over
    one flat partition (ZeRO-1/2 on 2 ranks), up to the step counters' scalars (8 bytes each)."""
    cfg = load_config(TINY_CONFIG)
    meta_student = build_models(cfg, device="meta")[1]
    for dtype, stage, world in ((torch.float32, 0, 1), (torch.bfloat16, 0, 1), (torch.float32, 2, 2)):
        student = build_transformer("tiny", seed=0).to(dtype)
        steps = optimizer_steps(meta_student, stage=stage, world=world, sub_group_size=1e9)
        params = list(student.parameters())
        if stage == 2:
            params = [torch.zeros(steps[0][0], dtype=dtype).requires_grad_()]
        for p in params:
            p.grad = torch.randn_like(p)
        flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        optimizer = torch.optim.AdamW(params, lr=1e-3, **flags)
        optimizer.step()  # the first step allocates the state, which the plan counts apart
        with AllocationPeak() as measured:
            optimizer.step()
        planned = adamw_temporaries(kind, steps, state_bytes=dtype.itemsize)
        scalars = 8 * len(params) if kind == "foreach" else 8
        assert planned <= measured.peak <= planned + scalars, (dtype, stage)
        assert (planned > 0) == (kind != "fused")
    # In the plan: a separate term of the trained engines, from the engine's AdamW implementation
    # (at ZeRO-0 in fp32; in bf16 the master-weight AdamW's, the test below).
    need = EngineNeeds("student", meta_student, True, 0, {}, adamw=kind)
    assert engine_memory(need, stage=0, world=1, precision="fp32").optimizer_temps == adamw_temporaries(
        kind, optimizer_steps(meta_student, stage=0, world=1, sub_group_size=1e9)
    )


def test_checkpointing_policies_are_parsed_per_engine_and_applied_per_block():
    cases = {
        "true": (1, 1),
        "false": (0, 0),
        "every:2": (2, 2),
        "{student: all}": (1, 0),
        "{student: none, teacher: 'every:3'}": (0, 3),
        "{teacher: true}": (0, 1),
    }
    for policy, strides in cases.items():
        model = load_config(TINY_CONFIG, [f"model.gradient_checkpointing={policy}"]).model
        assert (model.checkpoint_every("student"), model.checkpoint_every("teacher")) == strides, policy
    cfg = load_config(TINY_CONFIG, ["model.gradient_checkpointing={student: 'every:2'}"])
    teacher, student, _, _ = build_models(cfg, device="meta")
    assert student.checkpointed_blocks == [0, 2] and teacher.checkpointed_blocks == []
    assert student.transformer.gradient_checkpointing and not teacher.transformer.gradient_checkpointing
    errors = {
        "every:0": "model.gradient_checkpointing: 'every:0' is not all, none, every:K",
        "{teacher: sometimes}": "model.gradient_checkpointing.teacher: 'sometimes' is not",
        "{heads: all}": "model.gradient_checkpointing.heads: unknown engine (known: student, teacher)",
    }
    for policy, message in errors.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(TINY_CONFIG, [f"model.gradient_checkpointing={policy}"])


def test_checkpointing_policies_keep_the_losses_and_gradients():
    """Recomputing is the same math: every policy gives the no-checkpointing G-step loss and
    student gradients (fp32 on CPU: bit for bit)."""
    from ladd_ds.ladd.steps import LADDSteps

    cfg = load_config(TINY_CONFIG)
    teacher, student, heads, taps = build_models(cfg)
    teacher.requires_grad_(False)

    class Engine:
        def __init__(self, module):
            self.module = module

        def __call__(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    engines = type("Engines", (), {"student": Engine(student), "teacher": Engine(teacher), "heads": Engine(heads)})
    steps = LADDSteps(cfg, engines, taps=taps, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {
        "latent": torch.randn(2, 4, 16, 16, generator=g),
        "prompt_embeds": torch.randn(2, 8, 32, generator=g),
        "pooled": torch.randn(2, 16, generator=g),
        "sample_id": torch.arange(2),
    }
    noise = steps.draw_noise(batch)
    results = {}
    for every in ((0, 0), (1, 1), (2, 2), (1, 0), (0, 2)):
        student.set_checkpointing(every[0])
        teacher.set_checkpointing(every[1])
        student.zero_grad(set_to_none=True)
        loss = steps.generator_loss(batch, noise)[0]
        loss.backward()
        results[every] = loss.detach(), [p.grad.clone() for p in student.parameters()]
    base_loss, base_grads = results[(0, 0)]
    for every, (loss, grads) in results.items():
        assert torch.equal(loss, base_loss), every
        assert all(torch.equal(a, b) for a, b in zip(grads, base_grads)), every


def test_the_plan_counts_every_step_variant():
    """The plan runs the step code of each variant on meta models: R1's second heads pass and its
    double-backward graph add to the D step, the distillation loss runs the G step's teacher pass
    through its output layers (its guided passes run without gradients: the plan leaves them
    out), the image-conditioned tasks' wider inputs run, and DPO counts its model's forward on
    winners and losers."""
    from ladd_ds.dpo.method import dpo_activations, meta_dpo_models

    def plan(*sets):
        cfg = load_config(TINY_CONFIG, list(sets))
        teacher, student, heads, _ = build_models(cfg, device="meta")
        return step_activations(cfg, {"teacher": teacher, "student": student, "heads": heads}, flops=True)

    base = plan()
    assert plan("ladd.r1_gamma=1").phase_bytes("D step") > base.phase_bytes("D step")
    assert plan("ladd.distill_weight=1").kept["G step"]["teacher"] > base.kept["G step"]["teacher"]
    for task in ("inpaint", "edit"):
        assert plan(f"ladd.task={task}", "ladd.reuse_fakes=false").peak > 0
    cfg = load_config(TINY_CONFIG, ["model.gradient_checkpointing={student: 'every:2'}", "data.source=mds", "data.path=x"])
    dpo = dpo_activations(cfg, meta_dpo_models(cfg), flops=True)
    assert dpo.kept["step"]["model"] > 0 and dpo.recompute["step"] > 0 and dpo.recompute_flops > 0


def test_the_plans_master_step_temporaries_are_what_the_bf16_zero0_optimizer_allocates():
    """A bf16 ZeRO-0 engine steps with MasterWeightAdamW: its allocation peak in a step is one
    chunk of fp32 gradient copies (the plan's term), up to the gradient norm's scalars (one fp32
    per parameter and their stack), with the default chunk and with chunks smaller than the model."""
    from ladd_ds.distributed import engines as ds
    from ladd_ds.distributed import flat

    cfg = load_config(TINY_CONFIG)
    meta_student = build_models(cfg, device="meta")[1]
    planned = engine_memory(EngineNeeds("student", meta_student, True, 0, {}), stage=0, world=1, precision="bf16").optimizer_temps
    numels = [p.numel() for p in meta_student.parameters()]
    assert planned == sum(numels) * 4  # the tiny model is one chunk
    for limit in (flat.MASTER_CHUNK_ELEMENTS, sum(numels) // 3):
        student = build_transformer("tiny", seed=0).to(torch.bfloat16)
        params = list(student.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = ds.MasterWeightAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, chunk_elements=limit)
        optimizer.step()  # the first step allocates the moments, which the plan counts apart
        with AllocationPeak() as measured:
            optimizer.step()
        chunks = flat.chunks_by_elements(numels, limit)
        expected = max(sum(numels[i] for i in c) for c in chunks) * 4
        scalars = 4 * len(params) * 2 + 64
        assert expected <= measured.peak <= expected + scalars, (limit, measured.peak, expected)
        if limit == flat.MASTER_CHUNK_ELEMENTS:
            assert expected == planned
        else:
            assert expected < planned  # chunking bounds the temporaries

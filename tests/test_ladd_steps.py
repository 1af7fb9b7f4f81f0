"""Generator and discriminator steps on the real DeepSpeed engines (one gloo rank, in-process)."""

import math
from dataclasses import replace

import pytest
import torch

from ladd_ds.config import load_config
from ladd_ds.core import flow
from ladd_ds.methods import method_for
from ladd_ds.training.metrics import to_floats
from ladd_ds.training.trainer import Trainer
from tests.conftest import TINY_CONFIG, read_metrics


def local_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's copy of every parameter (under ZeRO-3 the partition; with one rank, all of it)."""
    return {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().clone() for n, p in module.named_parameters()}


def changed(before: dict, after: dict) -> list[str]:
    return [n for n in before if not torch.equal(before[n], after[n])]


def make_trainer(tmp_path, *overrides) -> Trainer:
    """The training loop around LADD; the tests drive its method's steps (`trainer.method`)."""
    cfg = load_config(TINY_CONFIG, [f"run.run_dir={tmp_path}", "logging.progress_bar=false", "optim.warmup_steps=0", *overrides])
    return Trainer(cfg, cfg.run.run_dir, method_for(cfg, "train"))


@pytest.fixture
def trainer(tmp_path, distributed_world_of_one):
    return make_trainer(tmp_path)


def test_generator_step_updates_only_the_student(trainer):
    e = trainer.method.engines
    batch = trainer.method.to_device(next(trainer.batches))
    student, teacher, heads = local_params(e.student.module), local_params(e.teacher.module), local_params(e.heads.module)
    metrics, fakes = trainer.method.generator_step(batch, trainer.method.draw_noise(batch))
    metrics = to_floats(metrics)
    assert math.isfinite(metrics["loss/generator"])
    assert fakes.x0.shape == batch["latent"].shape and not fakes.x0.requires_grad
    assert len(fakes.features) == len(trainer.method.taps) and not any(f.requires_grad for f in fakes.features)
    assert len(changed(student, local_params(e.student.module))) > 0.5 * len(student)
    assert changed(teacher, local_params(e.teacher.module)) == []
    assert changed(heads, local_params(e.heads.module)) == []
    assert all(p.grad is None for p in e.teacher.module.parameters())
    assert all(p.grad is None for p in e.heads.module.parameters())


def test_discriminator_step_updates_only_the_heads(trainer):
    e = trainer.method.engines
    batch = trainer.method.to_device(next(trainer.batches))
    noise = trainer.method.draw_noise(batch)
    _, fakes = trainer.method.generator_step(batch, noise)
    student, teacher, heads = local_params(e.student.module), local_params(e.teacher.module), local_params(e.heads.module)
    metrics = to_floats(trainer.method.discriminator_step(batch, noise, fakes))
    assert {"loss/discriminator", "d/real_logit", "d/fake_logit"} <= metrics.keys()
    assert len(changed(heads, local_params(e.heads.module))) > 0.5 * len(heads)
    assert changed(student, local_params(e.student.module)) == []
    assert changed(teacher, local_params(e.teacher.module)) == []
    assert all(p.grad is None for p in e.teacher.module.parameters())


def test_noise_depends_on_sample_id_and_step_not_on_batch_position(trainer):
    batch = trainer.method.to_device(next(trainer.batches))
    a = trainer.method.draw_noise(batch)
    flipped = {k: v.flip(0) for k, v in batch.items()}
    b = trainer.method.draw_noise(flipped)
    torch.testing.assert_close(a.eps_student, b.eps_student.flip(0))
    torch.testing.assert_close(a.t_fake, b.t_fake.flip(0))
    trainer.method.step += 1
    c = trainer.method.draw_noise(batch)
    assert not torch.allclose(a.eps_student, c.eps_student)


def test_d_step_reusing_the_g_steps_teacher_features_equals_recomputing_them(tmp_path, distributed_world_of_one):
    """ladd.reuse_fakes: the D step takes the teacher's features of the fakes from the G step
    (the same x0, noise and level) and runs the teacher on the reals only. Two identical runs, one
    given the features and one made to recompute them (reals and fakes in one 2B teacher call),
    get the same D loss and the same heads update, within round-off of the batch size."""
    runs = [make_trainer(tmp_path / name) for name in ("reused", "recomputed")]
    results = []
    for trainer, keep_features in zip(runs, (True, False)):
        method = trainer.method
        batch = method.to_device(next(trainer.batches))
        noise = method.draw_noise(batch)
        _, fakes = method.generator_step(batch, noise)
        if not keep_features:
            fakes = replace(fakes, features=None)
        metrics = to_floats(method.discriminator_step(batch, noise, fakes))
        results.append((metrics, local_params(method.engines.heads.module)))
    (m_reused, heads_reused), (m_recomputed, heads_recomputed) = results
    for key in ("loss/discriminator", "d/real_logit", "d/fake_logit"):
        assert m_reused[key] == pytest.approx(m_recomputed[key], rel=1e-5, abs=1e-6), key
    for name in heads_reused:
        torch.testing.assert_close(heads_reused[name], heads_recomputed[name], rtol=1e-5, atol=1e-6)


def test_recomputed_fakes_and_distillation(tmp_path, distributed_world_of_one):
    reuse = make_trainer(tmp_path / "reuse")
    variant = make_trainer(tmp_path / "variant", "ladd.reuse_fakes=false", "ladd.distill_weight=0.5")
    m_reuse = to_floats(reuse.method.train_step([reuse.method.to_device(next(reuse.batches))], 0))
    m_var = to_floats(variant.method.train_step([variant.method.to_device(next(variant.batches))], 0))
    # Same seed, same first batch: identical adversarial G loss; the D step differs because the
    # variant re-generated its fakes with the already-updated student.
    assert m_var["loss/generator"] == pytest.approx(m_reuse["loss/generator"], rel=1e-6)
    assert m_var["d/fake_logit"] != pytest.approx(m_reuse["d/fake_logit"], rel=1e-6)
    assert m_var["d/real_logit"] == pytest.approx(m_reuse["d/real_logit"], rel=1e-6)
    assert m_var["loss/distill"] > 0 and math.isfinite(m_var["loss/distill"])
    assert "loss/distill" not in m_reuse


def test_guided_distillation_target(tmp_path, distributed_world_of_one):
    """ladd.distill_cfg: the target is the teacher's x0 under classifier-free guidance with the
    empty prompt's conditioning; a negative prompt of another length than the data's is refused."""
    trainer = make_trainer(tmp_path, "ladd.distill_weight=1.0")
    assert trainer.method.distill_cfg == 1.0  # random latents record no guidance scale
    batch = trainer.method.to_device(next(trainer.batches))
    b, length, dim = batch["prompt_embeds"].shape
    neg_embeds = torch.randn(length, dim)
    neg_pooled = torch.randn(batch["pooled"].shape[1])
    noise = trainer.method.draw_noise(batch)
    x = flow.add_noise(batch["latent"], noise.eps_fake, noise.t_fake)
    teacher = trainer.method.engines.teacher.module
    with torch.no_grad():
        v_c = teacher(x, noise.t_fake, batch["prompt_embeds"], batch["pooled"])
        v_u = teacher(x, noise.t_fake, neg_embeds.expand(b, -1, -1), neg_pooled.expand(b, -1))
    t = noise.t_fake.view(-1, 1, 1, 1)
    torch.testing.assert_close(trainer.method.distill_target(x, noise.t_fake, batch), x - t * v_c)
    trainer.method.distill_cfg, trainer.method.negative = 3.0, (neg_embeds, neg_pooled)
    guided = trainer.method.distill_target(x, noise.t_fake, batch)
    torch.testing.assert_close(guided, x - t * (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    trainer.method.negative = (neg_embeds[:-2], neg_pooled)
    with pytest.raises(ValueError, match=r"negative prompt conditioning has shape \(6, 32\), its prompts \(8, 32\)"):
        trainer.method.distill_target(x, noise.t_fake, batch)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_guided_target_in_the_g_steps_teacher_call_equals_a_separate_pass(tmp_path, distributed_world_of_one, precision):
    """ladd.distill_cfg > 1 on a ZeRO-3 teacher: the empty prompt's pass rides in the G step's
    teacher call as the second half of a 2B batch (one top-level teacher forward, so ZeRO-3's
    prefetch trace holds). Two identical trainers, one per way, make the same G step: the same
    losses and the same student update (fp32 within round-off of the batch size; bf16 within its
    round-off)."""
    results = []
    for one_call in (True, False):
        trainer = make_trainer(tmp_path / str(one_call), "ladd.distill_weight=1.0", f"deepspeed.precision={precision}")
        method = trainer.method
        assert method.guidance_in_one_call  # the tiny config's teacher is ZeRO-3
        batch = method.to_device(next(trainer.batches))
        _, length, dim = batch["prompt_embeds"].shape
        g = torch.Generator().manual_seed(0)
        negative = (torch.randn(length, dim, generator=g), torch.randn(batch["pooled"].shape[1], generator=g))
        method.distill_cfg, method.negative = 3.0, tuple(x.to(method.dtype) for x in negative)
        method.guidance_in_one_call = one_call
        calls = []
        hook = method.engines.teacher.module.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
        metrics, fakes = method.generator_step(batch, method.draw_noise(batch))
        hook.remove()
        b = batch["latent"].shape[0]
        assert calls == ([2 * b] if one_call else [b, b])
        results.append((to_floats(metrics), fakes, local_params(method.engines.student.module)))
        trainer.close()
    (m_one, fakes_one, student_one), (m_two, fakes_two, student_two) = results
    rel, atol = (1e-5, 1e-6) if precision == "fp32" else (2e-2, 2e-3)
    for key in ("loss/generator", "loss/distill"):
        assert m_one[key] == pytest.approx(m_two[key], rel=rel, abs=atol), key
    for a, b in zip(fakes_one.features, fakes_two.features):
        torch.testing.assert_close(a, b, rtol=rel, atol=atol)
    for name in student_one:
        torch.testing.assert_close(student_one[name], student_two[name], rtol=rel, atol=atol)


def test_guided_distillation_needs_teacher_data(tmp_path, distributed_world_of_one):
    with pytest.raises(ValueError, match=r"ladd.distill_cfg = 3 needs data from `ladd-ds synth`"):
        make_trainer(tmp_path, "ladd.distill_weight=1.0", "ladd.distill_cfg=3.0")


def test_bf16_training_and_sampling_pass_the_same_fp32_timesteps(tmp_path, distributed_world_of_one):
    """t is never rounded to the model's dtype: in bf16, 1000 * 0.75 would be 752. Training's
    student inputs and the 4-step sampler hand the transformer exactly 1000 * t of the trained t's."""
    from ladd_ds.models.flow_model import FlowModel
    from ladd_ds.sampling import ladd_sample, student_schedule

    trainer = make_trainer(tmp_path, "deepspeed.precision=bf16")
    transformer = trainer.method.engines.student.module.transformer
    seen = []
    # The timestep's first use in the transformer (FlowModel runs its submodules itself).
    hook = transformer.time_text_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    batch = trainer.method.to_device(next(trainer.batches))
    noise = trainer.method.draw_noise(batch)
    assert noise.t_student.dtype == noise.t_fake.dtype == torch.float32
    x0 = trainer.method.student_x0(batch, noise)
    assert x0.dtype == torch.bfloat16
    trained = {1000.0 * t for t in trainer.cfg.ladd.student_timesteps}
    assert seen[0].dtype == torch.float32 and set(seen[0].tolist()) <= trained
    seen.clear()
    with torch.no_grad():
        ladd_sample(
            FlowModel(transformer), batch["prompt_embeds"], batch["pooled"], noise.eps_student, student_schedule(4), [0] * len(x0)
        )
    hook.remove()
    assert [s.unique().tolist() for s in seen] == [[1000.0], [750.0], [500.0], [250.0]]
    assert set(s.item() for s in torch.cat(seen)) <= trained


def test_r1_penalty_reaches_the_heads(tmp_path, distributed_world_of_one):
    plain = make_trainer(tmp_path / "plain")
    r1 = make_trainer(tmp_path / "r1", "ladd.r1_gamma=100.0")
    m_plain = to_floats(plain.method.train_step([plain.method.to_device(next(plain.batches))], 0))
    m_r1 = to_floats(r1.method.train_step([r1.method.to_device(next(r1.batches))], 0))
    assert m_r1["loss/r1"] > 0 and math.isfinite(m_r1["loss/r1"])
    assert "loss/r1" not in m_plain
    assert m_r1["loss/discriminator"] == pytest.approx(m_plain["loss/discriminator"], rel=1e-6)
    # Same data, same hinge loss: only the penalty's gradient can make the heads differ.
    assert changed(local_params(plain.method.engines.heads.module), local_params(r1.method.engines.heads.module))
    assert not changed(local_params(plain.method.engines.student.module), local_params(r1.method.engines.student.module))


def test_taps_out_of_range_are_rejected(tmp_path, distributed_world_of_one):
    with pytest.raises(ValueError, match=r"discriminator.taps: blocks \[7\] do not exist"):
        make_trainer(tmp_path, "discriminator.taps=[0, 7]")


def test_gradient_accumulation_equals_one_large_micro_batch(tmp_path, distributed_world_of_one):
    # A large Adam eps: on its first step Adam moves every weight by ~lr * sign(grad), which
    # turns round-off in near-zero gradients into lr-sized differences; with eps >> |grad| the
    # update is proportional to the gradient, which is what this test compares.
    common = ("optim.grad_clip=0", "optim.eps=0.01", "optim.student_lr=0.1", "optim.heads_lr=0.1")
    one = make_trainer(tmp_path / "one", *common)
    accum = make_trainer(tmp_path / "accum", "optim.grad_accum=2", "data.micro_batch_size=2", *common)
    batch = one.method.to_device(next(one.batches))  # 4 samples
    initial = {name: local_params(getattr(one.method.engines, name).module) for name in ("student", "heads")}
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    m_one = to_floats(one.method.train_step([batch], 0))
    m_acc = to_floats(accum.method.train_step(halves, 0))
    assert m_acc["loss/generator"] == pytest.approx(m_one["loss/generator"], rel=1e-5)
    for name in ("student", "heads"):
        a = local_params(getattr(one.method.engines, name).module)
        b = local_params(getattr(accum.method.engines, name).module)
        moved = max((a[k] - initial[name][k]).abs().max().item() for k in a)
        assert moved > 50 * 2e-6  # the step moved weights far more than the tolerance below
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}.{key}: {m}")


def test_a_samples_output_and_loss_do_not_depend_on_its_batch_neighbours(trainer):
    """With the one full-length conditioning nothing is padded to a batch's longest prompt: a
    sample batched with a short or with a long prompt gets the same student output, teacher
    target, head logits and per-sample losses (padding to the batch maximum changed the
    velocity by 1.3-1.6% on this tiny model)."""
    from ladd_ds.core import flow
    from ladd_ds.data.loader import collate
    from ladd_ds.ladd import losses
    from ladd_ds.models.text_encoders import build_tiny_text_encoders

    prompts = ["a red seven in the top left", "five", "three green twos next to a small yellow four"]
    embeds, pooled = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=16).encode(prompts)
    g = torch.Generator().manual_seed(0)
    samples = [
        {"latent": torch.randn(4, 16, 16, generator=g), "prompt_embeds": embeds[i], "pooled": pooled[i], "sample_id": i}
        for i in range(3)
    ]

    def contribution(batch):
        batch = trainer.method.to_device(batch)
        noise = trainer.method.draw_noise(batch)
        with torch.no_grad():
            x0 = trainer.method.student_x0(batch, noise)
            x_hat = flow.add_noise(x0, noise.eps_fake, noise.t_fake)
            features = trainer.method.teacher_features(x_hat, noise.t_fake, batch)
            logits = trainer.method.engines.heads.module(features, noise.t_fake, batch["pooled"])
            target = trainer.method.distill_target(x_hat, noise.t_fake, batch)
        first = [x[:1] for x in logits]
        return x0[0], target[0], first, losses.generator_hinge_loss(first), losses.distillation_loss(x0[:1], target[:1])

    short, long = contribution(collate([samples[0], samples[1]])), contribution(collate([samples[0], samples[2]]))
    for a, b in zip(short, long):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_bf16_on_cpu_runs_a_step(tmp_path, distributed_world_of_one):
    trainer = make_trainer(tmp_path, "deepspeed.precision=bf16")
    batch = trainer.method.to_device(next(trainer.batches))
    assert batch["latent"].dtype == torch.bfloat16
    m = to_floats(trainer.method.train_step([batch], 0))
    assert all(math.isfinite(v) for v in m.values())
    assert next(trainer.method.engines.student.module.parameters()).dtype == torch.bfloat16


def test_activation_checkpointing_gives_the_same_step(tmp_path, distributed_world_of_one):
    common = ("optim.eps=0.01", "optim.student_lr=0.1", "optim.heads_lr=0.1")
    plain = make_trainer(tmp_path / "plain", *common)
    ckpt = make_trainer(tmp_path / "ckpt", "model.gradient_checkpointing=true", *common)
    assert ckpt.method.engines.teacher.module.transformer.gradient_checkpointing
    batch = plain.method.to_device(next(plain.batches))
    m_plain = to_floats(plain.method.train_step([batch], 0))
    m_ckpt = to_floats(ckpt.method.train_step([batch], 0))
    assert m_ckpt["loss/generator"] == pytest.approx(m_plain["loss/generator"], rel=1e-6)
    a, b = local_params(plain.method.engines.student.module), local_params(ckpt.method.engines.student.module)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_export_equals_the_trained_weights(tmp_path, distributed_world_of_one):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from ladd_ds.export import export_run

    trainer = make_trainer(tmp_path / "run", "checkpoint.every=100")
    trainer.fit(2)  # ends with a checkpoint at step 2
    trained = local_params(trainer.method.engines.student.module)  # one rank: the full tensors
    out = export_run(tmp_path / "run", tmp_path / "export", dtype="fp32")
    model = SD3Transformer2DModel.from_pretrained(str(out), subfolder="transformer")
    exported = dict(model.named_parameters())
    assert len(exported) == len(trained)
    for name, value in trained.items():
        assert torch.equal(exported[name.removeprefix("transformer.")].detach().flatten(), value.flatten()), name
    heads = load_file(out / "discriminator" / "heads.safetensors")
    for name, value in local_params(trainer.method.engines.heads.module).items():
        assert torch.equal(heads[name].flatten(), value.flatten()), name
    ema = export_run(tmp_path / "run", tmp_path / "export_ema", ema=True, dtype="fp32")
    ema_model = SD3Transformer2DModel.from_pretrained(str(ema), subfolder="transformer")
    ema_weight = dict(ema_model.named_parameters())["proj_out.weight"].detach()
    torch.testing.assert_close(ema_weight.flatten(), trainer.method.ema.shadow["transformer.proj_out.weight"].flatten())
    # Sampling the export uses only the times the student trained on (ladd.student_timesteps).
    from ladd_ds.sampling import default_size, load_sampling_model, sample_latents

    sm = load_sampling_model(out)
    height, width = default_size(sm)
    assert sample_latents(sm, ["a prompt"], [0], height=height, width=width, steps=2, cfg=1.0).shape[0] == 1
    with pytest.raises(ValueError, match=r"--steps 3: the student was trained on t in"):
        sample_latents(sm, ["a prompt"], [0], height=height, width=width, steps=3, cfg=1.0)
    fp32 = sample_latents(sm, ["a prompt"], [0], height=height, width=width, steps=4, cfg=1.0)
    bf16 = sample_latents(
        load_sampling_model(out, precision="bf16"), ["a prompt"], [0], height=height, width=width, steps=4, cfg=1.0
    )
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), fp32, atol=0.1 * fp32.abs().max().item())


def test_no_host_sync_from_ladd_ds_between_logging_steps(tmp_path, distributed_world_of_one, monkeypatch):
    """Between logging steps, ladd_ds code reads nothing back from the device, so a GPU never waits
    for the host. Counted: Tensor.item / .tolist / .cpu / float() / bool() called from a ladd_ds
    frame on a floating-point or bool tensor (the device's data: latents, losses, logits, t)
    outside the logging step and the checkpoint. Integer tensors are the sample ids, which
    batch_to_device leaves on the host (checked first). The batches' copy to a GPU does not wait
    either: the loader pins them on a CUDA machine, and batch_to_device copies every tensor from
    pinned memory with non_blocking (its CUDA path, run here on a stand-in for the copy)."""
    import os
    import sys

    from ladd_ds.data.loader import batch_to_device

    raw = {"sample_id": torch.arange(3), "latent": torch.zeros(3, 2), "mask": torch.ones(3, dtype=torch.bool)}
    assert batch_to_device(raw, torch.device("cpu"), torch.bfloat16)["sample_id"] is raw["sample_id"]
    copies, pinned = [], set()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "pin_memory", lambda self: pinned.add(id(self)) or self)
        m.setattr(torch.Tensor, "is_pinned", lambda self: id(self) in pinned)

        def to(self, *args, **kwargs):
            if args and isinstance(args[0], torch.device):
                copies.append((args[0].type, kwargs.get("non_blocking", False), id(self) in pinned))
            return self

        m.setattr(torch.Tensor, "to", to)
        batch_to_device(raw, torch.device("cuda", 0), torch.bfloat16)
    assert copies == [("cuda", True, True)] * 2  # latent and mask; the sample ids stay on the host

    trainer = make_trainer(tmp_path, "logging.every=100", "checkpoint.every=100")
    assert trainer.loader.pin_memory == torch.cuda.is_available()
    calls, allowed = [], [0]
    marker = os.sep + "ladd_ds" + os.sep

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not allowed[0] and marker in caller and (self.is_floating_point() or self.dtype == torch.bool):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    def allowing(method):
        def wrapper(*args, **kwargs):
            allowed[0] += 1
            try:
                return method(*args, **kwargs)
            finally:
                allowed[0] -= 1

        return wrapper

    monkeypatch.setattr(trainer, "_log", allowing(trainer._log))
    monkeypatch.setattr(trainer, "save", allowing(trainer.save))
    for name in ("item", "tolist", "cpu", "__float__", "__bool__"):
        counting(name)
    trainer.fit(4)
    monkeypatch.undo()
    assert trainer.step == 4
    assert calls == [], calls
    logged = read_metrics(tmp_path)
    assert [r["step"] for r in logged] == [4] and math.isfinite(logged[0]["loss/discriminator"])


@pytest.mark.parametrize("distill_cfg", [1.0, 3.0])
def test_distillation_keeps_zero3_prefetch_trace_valid(tmp_path, distributed_world_of_one, distill_cfg):
    """With the distillation loss every teacher call is the same full pass, so ZeRO-3's prefetch
    trace of the teacher (and of the student) is never invalidated. DeepSpeed reports each
    invalidation when zero_optimization.log_trace_cache_warnings is on: 4 steps must report none.
    A guided target (distill_cfg 3) adds the empty prompt's pass to the G step's teacher call; its
    data: random latents as MDS shards with an empty prompt's conditioning next to them."""
    import json

    from ladd_ds.data.writer import write_negative_prompt, write_random_latents
    from tests.conftest import REPO, run_cli

    sets = ["--set", f"ladd.distill_cfg={distill_cfg}"]
    if distill_cfg != 1.0:
        cfg = load_config(TINY_CONFIG).data.random_latents
        data = write_random_latents(
            tmp_path / "data",
            num_samples=cfg.num_samples,
            latent_shape=(cfg.latent_channels, cfg.height, cfg.width),
            text_len=cfg.text_len,
            text_dim=cfg.text_dim,
            pooled_dim=cfg.pooled_dim,
        )
        g = torch.Generator().manual_seed(0)
        embeds, pooled = torch.randn(cfg.text_len, cfg.text_dim, generator=g), torch.randn(cfg.pooled_dim, generator=g)
        write_negative_prompt(data, embeds, pooled)
        sets += ["--set", "data.source=mds", "--set", f"data.path={data}"]
    for key, name in (("student_config", "zero3"), ("teacher_config", "zero3_frozen"), ("heads_config", "zero2")):
        template = json.loads((REPO / "ds_configs" / "cpu" / f"{name}.json").read_text())
        template["zero_optimization"]["log_trace_cache_warnings"] = True
        (tmp_path / f"{name}.json").write_text(json.dumps(template))
        sets += ["--set", f"deepspeed.{key}={tmp_path / f'{name}.json'}"]
    proc = run_cli(
        "train",
        "--config",
        str(TINY_CONFIG),
        "--run-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "4",
        "--set",
        "ladd.distill_weight=0.5",
        *sets,
        launcher="in-process",
    )
    assert "ZeRO stages: student 3, heads 2, teacher 3" in proc.stdout
    assert f"distillation target: teacher x0 with guidance scale {distill_cfg:g}" in proc.stdout
    assert "Invalidate trace cache" not in proc.stdout + proc.stderr


# The layout model.compile runs in: ZeRO-2 student (the default heads' stage), replicated teacher.
COMPILE_LAYOUT = ("deepspeed.student_stage=2", "deepspeed.teacher_stage=0")


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, rel, atol",
    # bf16: inductor keeps some intermediates in fp32; measured up to 4 bf16 ulps (2.2%) on the
    # losses of step 3, where eager bf16 is 4.5% from eager fp32. The logits average to near zero,
    # so their round-off is absolute: up to 2.9e-4 apart at step 1 in one CI run.
    [("fp32", 1e-5, 1e-6), ("bf16", 5e-2, 2e-3)],
)
def test_compiled_blocks_train_and_resume_as_eager(tmp_path, distributed_world_of_one, precision, rel, atol):
    """model.compile: the same 3 steps as eager within round-off, every block compiled whole (no
    graph break), parameter names and checkpoints unchanged, and a compiled run resumed after
    step 2 continues as the uninterrupted eager run; it resumes with gradient checkpointing (the
    same math, test_activation_checkpointing_gives_the_same_step), which runs the compiled blocks
    inside torch.utils.checkpoint. Compiling takes most of the time: on 2 cores 68 s per precision
    with an empty inductor cache (114 s and 127 s while other jobs shared the cores), 9-10 s with
    its kernels cached (inductor keeps them between runs)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.conftest import EXACT

    common = (*EXACT, *COMPILE_LAYOUT, f"deepspeed.precision={precision}", "checkpoint.every=1", "checkpoint.keep_last=3")
    eager = make_trainer(tmp_path / "eager", *common)
    eager.fit(3)
    torch._dynamo.reset()  # compile here even if an earlier test compiled the same graphs
    counters.clear()
    compiled = make_trainer(tmp_path / "compiled", "model.compile=true", *common)
    for name in ("student", "teacher"):
        module = getattr(compiled.method.engines, name).module
        assert all(block._compiled_call_impl is not None for block in module.transformer.transformer_blocks)
        assert list(module.state_dict()) == list(getattr(eager.method.engines, name).module.state_dict())
    compiled.fit(2)
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], list(counters["graph_break"])
    saved = next((tmp_path / "compiled" / "checkpoints").glob("step-00000002/student/*model_states.pt"))
    assert list(torch.load(saved, weights_only=False)["module"]) == list(eager.method.engines.student.module.state_dict())

    resumed = make_trainer(tmp_path / "compiled", "model.compile=true", "model.gradient_checkpointing=true", *common)
    assert resumed.step == 2 and resumed.method.engines.student.module.transformer.gradient_checkpointing
    resumed.fit(3)
    assert not counters["graph_break"], list(counters["graph_break"])
    eager_metrics, compiled_metrics = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled_metrics] == [r["step"] for r in eager_metrics] == [1, 2, 3]
    for e, c in zip(eager_metrics, compiled_metrics):
        for key in ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit", "grad_norm/student"):
            assert c[key] == pytest.approx(e[key], rel=rel, abs=atol), (c["step"], key)
    a, b = local_params(eager.method.engines.student.module), local_params(resumed.method.engines.student.module)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rel, atol=atol)


def test_compile_refuses_zero3_engines(tmp_path, distributed_world_of_one, capsys):
    """Under ZeRO-3 a compiled block would break into a graph per submodule: the run and its dry
    run stop before any model is built, naming the keys to change."""
    from ladd_ds.config import ConfigError
    from tests.conftest import cli_error

    with pytest.raises(ConfigError, match=r"model.compile: deepspeed.student_stage and deepspeed.teacher_stage use ZeRO-3"):
        make_trainer(tmp_path, "model.compile=true")
    args = ("train", "--config", str(TINY_CONFIG), "--dry-run", "--set", "model.compile=true", "--set", COMPILE_LAYOUT[0])
    err = cli_error(capsys, *args)
    assert "model.compile: deepspeed.teacher_stage uses ZeRO-3" in err

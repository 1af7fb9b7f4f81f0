"""The digits demo's inpainting and editing tasks: examples, metrics, and their small teachers."""

from __future__ import annotations

import json
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ladd_ds.demo import digits, tasks
from ladd_ds.demo.pretrain import INFO_FILE, PretrainSettings, cached_teacher, task_settings
from ladd_ds.models.conditioning import join_condition, latent_mask


def glyph_pixels(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: where an image in [-1, 1] is not black."""
    return (image > -1.0).any(0)


def bbox(pixels: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = pixels.any(1).nonzero(), pixels.any(0).nonzero()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def quadrant_of(pixels: torch.Tensor) -> str:
    top, bottom, left, right = bbox(pixels)
    h, w = pixels.shape
    assert bottom < h // 2 or top >= h // 2, "a digit stays inside its quadrant"
    assert right < w // 2 or left >= w // 2
    return ("top" if bottom < h // 2 else "bottom") + (" left" if right < w // 2 else " right")


def colour_of(image: torch.Tensor) -> str:
    """The demo color every lit pixel of an image in [-1, 1] is a multiple of."""
    lit = glyph_pixels(image)
    rgb = ((image + 1) / 2)[:, lit]  # (3, N)
    brightest = rgb[:, rgb.sum(0).argmax()]
    for name, c in digits.COLORS.items():
        if torch.allclose(brightest / brightest.max(), torch.tensor(c) / max(c), atol=1e-4):
            return name
    raise AssertionError(f"no demo color: {brightest}")


@pytest.mark.parametrize("bucket", digits.BUCKETS)
def test_inpaint_examples_are_reproducible_with_masks_of_both_kinds(bucket):
    examples = tasks.inpaint_examples(48, "train", seed=3, bucket=bucket)
    again = tasks.inpaint_examples(48, "train", seed=3, bucket=bucket)
    other = tasks.inpaint_examples(48, "heldout", seed=3, bucket=bucket)
    assert all(torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) for a, b in zip(examples, again))
    assert not all(torch.equal(a.image, b.image) for a, b in zip(examples, other))
    assert {e.kind for e in examples} == set(digits.MASK_KINDS)
    h, w = bucket
    for e in examples:
        assert e.image.shape == (3, h, w) and e.mask.shape == (1, h, w)
        assert e.image.min() >= -1 and e.image.max() <= 1
        assert e.prompt == e.label.prompt and e.label.place is not None
        digit, hole = glyph_pixels(e.image), e.mask[0].bool()
        assert quadrant_of(digit) == e.label.place and colour_of(e.image) == e.label.color
        # Whole cells of the latent grid: the latent mask, upsampled, is the pixel mask.
        assert torch.equal(F.interpolate(latent_mask(e.mask[None], 2), scale_factor=2)[0], e.mask)
        if e.kind == "region":  # the whole quadrant: the digit is hidden entirely
            assert hole.sum() == (h // 2) * (w // 2) and not (digit & ~hole).any()
        else:  # a box over part of the digit: some of it is hidden, some is kept
            assert hole.sum() in (16, 24, 36) and (digit & hole).any() and (digit & ~hole).any()


def test_inpaint_batch_is_the_conditioning_convention():
    examples = tasks.inpaint_examples(6, "train", seed=0, bucket=(16, 24))
    x0, condition, prompts = tasks.inpaint_batch(examples)
    assert x0.shape == (6, 12, 8, 12) and condition.shape == (6, 13, 8, 12)
    images = torch.stack([e.image for e in examples])
    masks = torch.stack([e.mask for e in examples])
    assert torch.equal(x0, digits.CODEC.encode(images))
    # The masked image's latent decodes to the image with the hole black (-1 -> 0 in [-1, 1]).
    assert torch.allclose(digits.CODEC.decode(condition[:, :12]), images * (1 - masks))
    assert torch.equal(condition[:, 12:], latent_mask(masks, 2))
    assert prompts == [e.label.prompt for e in examples]


@pytest.mark.parametrize("bucket", digits.BUCKETS)
def test_edit_examples_change_exactly_the_requested_attribute(bucket):
    examples = tasks.edit_examples(60, "train", seed=5, bucket=bucket)
    again = tasks.edit_examples(60, "train", seed=5, bucket=bucket)
    assert all(torch.equal(a.target, b.target) and a.instruction == b.instruction for a, b in zip(examples, again))
    assert {e.kind for e in examples} == set(digits.EDIT_KINDS)
    for e in examples:
        src, tgt = e.source_label, e.target_label
        changed = {k for k in ("digit", "color", "place") if getattr(src, k) != getattr(tgt, k)}
        assert changed == {e.kind}
        assert e.instruction == digits.edit_instruction(e.kind, tgt)
        s_px, t_px = glyph_pixels(e.source), glyph_pixels(e.target)
        assert (quadrant_of(s_px), colour_of(e.source)) == (src.place, src.color)
        assert (quadrant_of(t_px), colour_of(e.target)) == (tgt.place, tgt.color)
        if e.kind == "color":  # the same glyph in the same place
            assert torch.equal(s_px, t_px)
        if e.kind == "place":  # the same glyph, shifted by half the image per changed half
            h, w = bucket
            rows = h // 2 * (tgt.place.startswith("bottom") - src.place.startswith("bottom"))
            cols = w // 2 * (tgt.place.endswith("right") - src.place.endswith("right"))
            assert torch.equal(torch.roll(e.source, (rows, cols), dims=(1, 2)), e.target)


def test_edit_instructions_are_whole_words_of_the_edit_teachers_tokenizer():
    from ladd_ds.demo.pretrain import CLIP_CONTEXT
    from ladd_ds.models.text_encoders import build_tiny_text_encoders

    assert not set(digits.EDIT_WORDS) <= set(digits.PROMPT_WORDS)  # the edit task has words of its own
    text = build_tiny_text_encoders(
        "demo", drop_t5=True, max_sequence_length=0, clip_tokens=CLIP_CONTEXT, words=tasks.task_words("edit")
    )
    instructions = digits.edit_instructions()
    assert len(set(instructions)) == 18
    for instruction in instructions:
        ids = text.pipe.tokenizer(instruction).input_ids
        assert len(ids) == len(instruction.split()) + 2 <= CLIP_CONTEXT  # start, one per word, end


def test_task_teachers_have_keys_of_their_own_and_the_t2i_key_is_unchanged():
    from ladd_ds.demo.presets import SIZES, teacher_settings

    t2i = teacher_settings(SIZES["full"])
    # The cache entry of the demo's text-to-image teacher as trained before the tasks existed.
    assert t2i.key() == "6002a066f364"
    keys = {t2i.key(), *(task_settings(t, t2i).key() for t in ("inpaint", "edit"))}
    keys |= {task_settings(t, t2i, init=False).key() for t in ("inpaint", "edit")}
    keys.add(task_settings("edit", replace(t2i, steps=10)).key())  # another initial teacher
    assert len(keys) == 6
    with pytest.raises(ValueError, match="task"):
        PretrainSettings(task="outpaint")
    with pytest.raises(ValueError, match="init_from"):
        PretrainSettings(init_from=task_settings("edit", t2i))
    # The edit teacher's own schedule: weighted kinds and shifted times, each part of the key.
    edit = task_settings("edit", t2i)
    assert edit.time_shift > 1 and edit.kinds.count("place") > edit.kinds.count("color")
    assert len({edit.key(), replace(edit, kinds=()).key(), replace(edit, time_shift=1.0).key()}) == 3
    # A share of t = 1 samples is part of the key (0, the default, keeps the old one).
    assert replace(t2i, t1_share=0.3).key() != t2i.key() == replace(t2i, t1_share=0.0).key()
    with pytest.raises(ValueError, match="t1_share"):
        replace(t2i, t1_share=1.0)
    with pytest.raises(ValueError, match="kinds.*edit"):
        replace(edit, kinds=("box",))
    with pytest.raises(ValueError, match="kinds.*t2i"):
        replace(t2i, kinds=("place",))
    with pytest.raises(ValueError, match="time_shift"):
        replace(edit, time_shift=0.0)


def test_task_training_batches_draw_the_settings_kinds():
    from ladd_ds.demo.pretrain import training_batch

    source = digits.load_source_digits("train")
    moves = {digits.edit_instruction("place", digits.DigitLabel(0, "red", p)) for p in digits.PLACES}
    base = PretrainSettings(task="edit", batch_size=12)
    _, _, prompts = training_batch(replace(base, kinds=("place",)), 0, source)
    assert set(prompts) <= moves
    _, _, prompts = training_batch(base, 0, source)
    assert set(prompts) - moves  # every kind when none is named
    _, masked, _ = training_batch(replace(base, task="inpaint", kinds=("region",)), 1, source)
    mask = masked[:, -1:]  # inpaint: masked latent, then the mask at latent resolution
    assert all(m.sum() == m.numel() / 4 for m in mask)  # one whole quadrant each


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_loss_shifts_the_training_times_towards_noise(shift):
    from ladd_ds.core.flow import sample_logit_normal
    from ladd_ds.demo.pretrain import PromptTable, flow_matching_loss

    class Table(PromptTable):
        def __init__(self):
            pass

        def lookup(self, prompts):
            return torch.zeros(len(prompts), 3, 8), torch.zeros(len(prompts), 8)

    seen = []

    def model(x, t, embeds, pooled):
        seen.append(t)
        return torch.zeros_like(x[:, :12])

    x0 = torch.randn(64, 12, 4, 4)
    flow_matching_loss(
        model, Table(), x0, None, ["a"] * 64, caption_dropout=0.1, gen=torch.Generator().manual_seed(0), time_shift=shift
    )
    gen = torch.Generator().manual_seed(0)
    torch.rand(64, generator=gen), torch.randn(x0.shape, generator=gen)  # the loss's draws before the times
    t = sample_logit_normal((64,), generator=gen)
    assert torch.allclose(seen[0], shift * t / (1 + (shift - 1) * t))
    assert (seen[0] >= t).all() and (shift == 1.0 or seen[0].mean() > t.mean() + 0.05)


class Oracle(torch.nn.Module):
    """A stand-in for the demo classifier that knows the labels of given images: logits that read
    a known image (up to bf16 rounding) as its label, and any other image as an extra 'unknown'
    class that never matches a label."""

    def __init__(self, images: torch.Tensor, labels: list[digits.DigitLabel]):
        super().__init__()
        self.images, self.labels = (images + 1) / 2, labels

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = {"digit": 10, "color": len(digits.COLORS), "place": len(digits.PLACES)}
        out = {k: torch.zeros(len(images), n + 1) for k, n in sizes.items()}
        for i, image in enumerate(images):
            match = [
                j for j, known in enumerate(self.images) if known.shape == image.shape and (known - image).abs().max() < 0.02
            ]
            if not match:
                for k, n in sizes.items():
                    out[k][i, n] = 1.0
                continue
            label = self.labels[match[0]]
            out["digit"][i, label.digit] = 1.0
            out["color"][i, list(digits.COLORS).index(label.color)] = 1.0
            out["place"][i, digits.PLACES.index(label.place)] = 1.0
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inpaint_metrics_score_kept_error_and_alignment(dtype):
    examples = tasks.inpaint_examples(8, "heldout", seed=1, bucket=(16, 16))
    images = torch.stack([e.image for e in examples])
    masks = torch.stack([e.mask for e in examples])
    labels = [e.label for e in examples]
    oracle = Oracle(images, labels)
    perfect = tasks.inpaint_metrics(oracle, images.to(dtype), images, masks, labels)
    assert perfect["alignment"] == 1.0 and perfect["kept_error"] < 0.01
    # Right inside the hole, wrong outside: pasted back it is the image (aligned), but the kept
    # region's error is that of the changes, averaged over the kept pixels.
    shifted = images + 0.5 * (1 - masks)
    m = tasks.inpaint_metrics(oracle, shifted.to(dtype), images, masks, labels)
    assert m["alignment"] == 1.0 and m["kept_error"] == pytest.approx(0.5, abs=0.01)
    # The kept region right, the hole left black: the digit is (partly) missing, not aligned.
    blank = tasks.inpaint_metrics(oracle, (images * (1 - masks) - masks).to(dtype), images, masks, labels)
    assert blank["alignment"] == 0.0 and blank["kept_error"] < 0.01
    half = torch.cat([images[:4], images[4:] * (1 - masks[4:]) - masks[4:]])
    assert tasks.inpaint_metrics(oracle, half.to(dtype), images, masks, labels)["alignment"] == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edit_metrics_score_success_and_preservation(dtype):
    examples = tasks.edit_examples(12, "heldout", seed=2, bucket=(16, 24))
    sources, targets = torch.stack([e.source for e in examples]), torch.stack([e.target for e in examples])
    src, tgt, kinds = [e.source_label for e in examples], [e.target_label for e in examples], [e.kind for e in examples]
    oracle = Oracle(torch.cat([sources, targets]), src + tgt)
    real = tasks.edit_metrics(oracle, targets.to(dtype), sources, src, tgt, kinds)
    assert real["success"] == 1.0 and real["preservation"] == 1.0
    assert {f"success/{k}" for k in digits.EDIT_KINDS} <= set(real)
    unchanged = tasks.edit_metrics(oracle, sources.to(dtype), sources, src, tgt, kinds)
    assert unchanged["success"] == 0.0 and unchanged["preservation"] == 1.0
    # Another example's target: a wrong edit that also changes what should have stayed.
    wrong = tasks.edit_metrics(oracle, targets.roll(1, 0).to(dtype), sources, src, tgt, kinds)
    shown = [tgt[i - 1] for i in range(12)]  # the label of what example i got
    others = [[k for k in digits.EDIT_KINDS if k != kind] for kind in kinds]
    kept = sum(all(getattr(a, k) == getattr(b, k) for k in ks) for a, b, ks in zip(shown, src, others))
    done = sum(getattr(a, kind) == getattr(b, kind) for a, b, kind in zip(shown, tgt, kinds))
    assert wrong["success"] == pytest.approx(done / 12)
    expected = kept / 12
    assert wrong["preservation"] == pytest.approx(expected) and wrong["preservation"] < 1.0
    # A classifier that misreads every glyph kept by color and place edits (the same way on the source
    # and on its faithful copy): preservation compares with its reading of the source, so real targets
    # still score 1; against the source labels only the digit edits (whose new glyph it reads) keep.
    misread = [replace(lb, digit=(lb.digit + 1) % 10) for lb in src]
    copies = [replace(t, digit=m.digit) if kind != "digit" else t for t, m, kind in zip(tgt, misread, kinds)]
    biased_reader = Oracle(torch.cat([sources, targets]), misread + copies)
    biased = tasks.edit_metrics(biased_reader, targets.to(dtype), sources, src, tgt, kinds)
    assert biased["preservation"] == 1.0 and biased["success"] == 1.0
    assert biased["preservation_vs_label"] == pytest.approx(kinds.count("digit") / 12) and "digit" in kinds
    with pytest.raises(ValueError, match="edit kinds"):
        tasks.edit_metrics(oracle, targets, sources, src, tgt, ["size"] * 12)


def test_task_teachers_train_from_the_t2i_teacher_and_sample_their_condition(tmp_path):
    """Tiny step counts: the folders, their task, widened channels and the t2i initialisation."""
    from ladd_ds.models.flow_model import FlowModel
    from ladd_ds.models.registry import build_transformer
    from ladd_ds.models.text_encoders import load_sd3_text_encoders

    base = PretrainSettings(steps=2, batch_size=4)
    start = task_settings("inpaint", base, steps=0)  # the widened t2i teacher, untrained
    folder, cached = cached_teacher(tmp_path, start)
    assert not cached and (tmp_path / f"demo-teacher-{base.key()}" / INFO_FILE).is_file()  # trained on the way
    t2i = build_transformer(str(tmp_path / f"demo-teacher-{base.key()}"))
    widened = build_transformer(str(folder), task="inpaint")
    w0, w1 = t2i.pos_embed.proj.weight, widened.pos_embed.proj.weight
    assert w1.shape[1] == 25 and torch.equal(w1[:, :12], w0) and not w1[:, 12:].any()

    for task, extra, make in (("inpaint", 13, tasks.inpaint_examples), ("edit", 12, tasks.edit_examples)):
        folder, cached = cached_teacher(tmp_path, replace(task_settings(task, base, steps=2), batch_size=4))
        info = json.loads((folder / INFO_FILE).read_text())
        assert not cached and info["task"] == task and info["settings"]["task"] == task
        assert folder.name.startswith(f"demo-{task}-teacher-")
        assert cached_teacher(tmp_path, replace(task_settings(task, base, steps=2), batch_size=4)) == (folder, True)
        model = FlowModel(build_transformer(str(folder), task=task)).eval()
        assert model.transformer.config.in_channels == 12 + extra and model.transformer.config.out_channels == 12
        text = load_sd3_text_encoders(folder, drop_t5=True, max_sequence_length=0)
        x0, condition, prompts = tasks.TASK_BATCHES[task][1](make(3, "heldout", seed=0, bucket=(16, 24)))
        embeds, pooled = text.encode(prompts + [""] * 3)  # a guidance batch: the condition repeats
        with torch.no_grad():
            v = model(join_condition(torch.randn(6, 12, 8, 12), condition), torch.full((6,), 0.5), embeds, pooled)
        assert v.shape == (6, 12, 8, 12) and torch.isfinite(v).all()


@pytest.mark.parametrize("task", ["t2i", "inpaint", "edit"])
def test_pretrain_teacher_command_takes_the_task(monkeypatch, tmp_path, task):
    from ladd_ds import cli
    from ladd_ds.demo import pretrain
    from ladd_ds.demo.presets import SIZES, teacher_settings

    calls = []
    monkeypatch.setattr(
        pretrain, "pretrain_teacher", lambda out, s, cache_dir=None, overwrite=False: calls.append((s, cache_dir)) or out
    )
    args = ["pretrain-teacher", "--out", str(tmp_path / "t"), "--steps", "3", "--task", task, "--cache", str(tmp_path)]
    assert cli.main(args) == 0
    (settings, cache), t2i = calls[0], teacher_settings(SIZES["full"])
    assert settings.task == task and settings.steps == 3 and cache == tmp_path
    if task == "t2i":
        assert settings.init_from is None
    else:  # started from the demo's text-to-image teacher, the one `ladd-ds demo` caches
        assert settings.init_from.key() == t2i.key()


def test_task_measures_average_per_kind_over_that_kinds_examples():
    """A per-kind measure pools the buckets by their examples of that kind, the overall measures by
    the buckets' sizes."""
    from ladd_ds.demo.task_pipeline import TaskEvaluator

    evaluator = TaskEvaluator("edit", torch.nn.Identity(), n=12, num_real=0, frechet=None)
    buckets = list(evaluator.examples.values())
    counts = [sum(e.kind == "place" for e in ex) for ex in buckets]
    assert len(buckets) == 2 and counts[0] != counts[1]  # this draw tells the weightings apart
    measures = [
        {"success": 1.0, "preservation": 0.5, "success/place": 1.0},
        {"success": 0.0, "preservation": 0.5, "success/place": 0.0},
    ]
    averaged = evaluator._average(measures)
    assert averaged["success"] == pytest.approx(0.5) and averaged["preservation"] == pytest.approx(0.5)
    assert averaged["success/place"] == pytest.approx(counts[0] / sum(counts))


def test_t1_share_trains_that_share_of_samples_at_pure_noise():
    """flow_matching_loss with t1_share: those samples' input is the noise itself, at t = 1; the
    rest keep the logit-normal times (never exactly 1)."""
    from ladd_ds.demo.pretrain import flow_matching_loss

    class Recorder(torch.nn.Module):
        def forward(self, x, t, embeds, pooled):
            self.t = t
            return torch.zeros_like(x)

    table = types.SimpleNamespace(lookup=lambda prompts: (torch.zeros(len(prompts), 2, 4), torch.zeros(len(prompts), 4)))
    x0 = torch.zeros(4000, 1, 1, 1)
    model = Recorder()
    flow_matching_loss(
        model, table, x0, None, ["a"] * 4000, caption_dropout=0.0, gen=torch.Generator().manual_seed(0), t1_share=0.3
    )
    at_one = (model.t == 1.0).float().mean().item()
    assert 0.27 < at_one < 0.33
    flow_matching_loss(model, table, x0, None, ["a"] * 4000, caption_dropout=0.0, gen=torch.Generator().manual_seed(0))
    assert not (model.t == 1.0).any()

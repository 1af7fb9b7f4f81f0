"""Widening a text-to-image transformer for image conditions (inpainting, editing)."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from ladd_ds.models.conditioning import condition_channels, widen_input_channels
from ladd_ds.models.registry import build_transformer


def forward(model, latent, t=0.5):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    embeds = torch.randn(latent.shape[0], 5, cfg.joint_attention_dim, generator=g, dtype=latent.dtype)
    pooled = torch.randn(latent.shape[0], cfg.pooled_projection_dim, generator=g, dtype=latent.dtype)
    timestep = torch.full((latent.shape[0],), 1000 * t)
    return model(hidden_states=latent, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep).sample


@pytest.mark.parametrize("task, dtype", [("inpaint", torch.float32), ("edit", torch.float32), ("inpaint", torch.bfloat16)])
def test_a_widened_model_equals_the_original_whatever_the_conditions(task, dtype, tmp_path):
    original = build_transformer("tiny", seed=0, dtype=dtype)
    extra = condition_channels(task, original.config.in_channels)
    widened = widen_input_channels(build_transformer("tiny", seed=0, dtype=dtype), extra)
    assert widened.config.in_channels == 4 + extra and widened.config.out_channels == 4
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    conditions = torch.randn(2, extra, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = forward(original, latent)
    for cond in (torch.zeros_like(conditions), conditions):  # zero weights: the conditions do not count yet
        got = forward(widened, torch.cat([latent, cond], dim=1))
        assert got.shape == want.shape and torch.equal(got, want)
    widened.save_pretrained(tmp_path / "transformer")
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=dtype)
    assert torch.equal(forward(loaded, torch.cat([latent, conditions], dim=1)), want)
    assert condition_channels("t2i", 4) == 0 and widen_input_channels(original, 0) is original
    with pytest.raises(ValueError, match="task 'depth'"):
        condition_channels("depth", 4)


@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_conditioned_datasets_are_written_validated_and_batched(task, tmp_path):
    from ladd_ds.core.errors import InputError
    from ladd_ds.data.loader import build_loader
    from ladd_ds.data.schema import LATENTS, TASK_LAYOUTS, validate_mds_dir
    from ladd_ds.data.writer import write_samples

    layout = TASK_LAYOUTS[task]
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        row = {"latent": torch.randn(4, 2, 2, generator=g), "prompt_embeds": torch.zeros(3, 8), "pooled": torch.zeros(8)}
        row |= {"prompt": f"p{i}", "condition": torch.randn(4, 2, 2, generator=g)}
        if task == "inpaint":
            row["mask"] = (torch.rand(1, 2, 2, generator=g) > 0.5).float()
        rows.append(row)
    path = write_samples(tmp_path / task, rows, layout=layout)
    assert validate_mds_dir(path, layout)["num_samples"] == 4
    batches = list(build_loader(path, 2, seed=0, shuffle=False, layout=layout))
    assert len(batches) == 2 and set(layout.latent_columns) <= set(batches[0])
    torch.testing.assert_close(batches[0]["condition"][1], rows[1]["condition"], atol=2e-3, rtol=1e-3)  # stored as fp16
    if task == "inpaint":
        assert batches[1]["mask"].shape == (2, 1, 2, 2) and torch.equal(batches[1]["mask"][0], rows[2]["mask"])
    plain = write_samples(
        tmp_path / "plain", [{k: r[k] for k in ("latent", "prompt_embeds", "pooled", "prompt")} for r in rows], layout=LATENTS
    )
    with pytest.raises(
        InputError, match=rf"missing column 'condition', so it is not a {layout.name} dataset.*ladd-ds synth --task {task}"
    ):
        validate_mds_dir(plain, layout)

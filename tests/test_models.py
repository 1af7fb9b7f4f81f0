import pytest
import torch

from ladd_ds.models.flow_model import FlowModel, tokens_to_grid
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.models.registry import PRESETS, build_transformer, count_parameters


def _inputs(b=2, h=8, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = PRESETS["tiny"]
    return (
        torch.randn(b, cfg["in_channels"], h, w, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, 5, cfg["joint_attention_dim"], generator=g),
        torch.randn(b, cfg["pooled_projection_dim"], generator=g),
    )


def test_taps_on_a_2_to_1_grid_equal_the_blocks_image_tokens():
    model = FlowModel(build_transformer("tiny", seed=0)).eval()
    x, t, text, pooled = _inputs(h=8, w=16)
    captured = {}
    hooks = [
        blk.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[1]))
        for k, blk in enumerate(model.transformer.transformer_blocks)
    ]
    with torch.no_grad():
        model(x, t, text, pooled)  # full diffusers forward records every block's image tokens
        captured_full = dict(captured)
        captured.clear()
        feats = model(x, t, text, pooled, taps=[0, 1])
    for h in hooks:
        h.remove()
    assert [f.shape for f in feats] == [(2, model.feature_dim, 4, 8)] * 2  # 8x16 latent, patch 2
    for k, f in zip([0, 1], feats):
        torch.testing.assert_close(f, tokens_to_grid(captured_full[k], 4, 8))
    # The forward stopped after the last tapped block: block 2 never ran.
    assert set(captured) == {0, 1}


def test_full_pass_gives_the_taps_and_the_diffusers_velocity():
    """`velocity=True`: one pass through every block gives the same tapped tokens as the early-
    stopping pass and the same velocity as diffusers' own forward (on a 2:1 latent)."""
    model = FlowModel(build_transformer("tiny", seed=0)).eval()
    x, t, text, pooled = _inputs(h=8, w=16)
    with torch.no_grad():
        v = model(x, t, text, pooled)
        feats = model(x, t, text, pooled, taps=[0, 1])
        full_feats, full_v = model(x, t, text, pooled, taps=[0, 1], velocity=True)
    assert full_v.shape == v.shape == x.shape
    torch.testing.assert_close(full_v, v)
    for a, b in zip(full_feats, feats):
        torch.testing.assert_close(a, b)


def test_tokens_to_grid_is_row_major_like_patch_embed():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (B, N=2x3, C)
    grid = tokens_to_grid(tokens, 2, 3)
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 5])  # row 1, column 2 is token 1*3+2


def test_heads_give_one_logit_map_per_tap_and_depend_on_conditioning():
    model = FlowModel(build_transformer("tiny", seed=0))
    x, t, text, pooled = _inputs(h=8, w=16)
    feats = [f.detach() for f in model(x, t, text, pooled, taps=[0, 2])]
    heads = DiscriminatorHeads(model.feature_dim, num_heads=2, pooled_dim=pooled.shape[1], hidden=16)
    logits = heads(feats, t, pooled)
    assert len(logits) == 2 and all(lg.shape == (2, 1, 4, 8) for lg in logits)
    other_t = heads(feats, torch.full_like(t, 0.99), pooled)
    other_text = heads(feats, t, torch.randn_like(pooled))
    assert not torch.allclose(logits[0], other_t[0])
    assert not torch.allclose(logits[0], other_text[0])
    with pytest.raises(ValueError, match="3 feature maps for 2 heads"):
        heads(feats + feats[:1], t, pooled)


def test_presets_have_the_published_sizes():
    medium = count_parameters(build_transformer("sd3-medium", device="meta"))
    large = count_parameters(build_transformer("sd3-large", device="meta"))
    assert 2.0e9 < medium < 2.1e9  # "2B"
    assert 8.0e9 < large < 8.1e9  # "8B"


def test_local_folder_loads_the_saved_weights(tmp_path):
    model = build_transformer("tiny", seed=3)
    model.save_pretrained(tmp_path / "transformer")
    loaded = build_transformer(str(tmp_path), seed=99)  # the seed must not matter for a folder
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_model_errors_name_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="neither a preset .*tiny.*nor an existing folder"):
        build_transformer("sd3-huge")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="has no transformer/config.json"):
        build_transformer(str(tmp_path))

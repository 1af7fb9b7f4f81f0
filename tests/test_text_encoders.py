"""SD3 text conditioning with tiny encoders built in code (no downloads)."""

import pytest
import torch
from transformers import CLIPTokenizer

from ladd_ds.models.registry import PRESETS
from ladd_ds.models.text_encoders import CLIP_TOKENS, build_tiny_text_encoders, load_sd3_text_encoders

PROMPTS = ["a red seven in the top left", "a blue one", ""]


@pytest.fixture(scope="module")
def encoder():
    return build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32)


def test_full_conditioning_has_sd3_layout(encoder):
    embeds, pooled = encoder.encode(PROMPTS)
    tiny = PRESETS["tiny"]
    assert embeds.shape == (3, CLIP_TOKENS + 32, tiny["joint_attention_dim"])
    assert pooled.shape == (3, tiny["pooled_projection_dim"])
    assert embeds[:, CLIP_TOKENS:].abs().sum() > 0  # the T5 block is real
    assert not torch.allclose(pooled[0], pooled[1])
    again = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).encode(PROMPTS)[0]
    assert torch.equal(again, embeds)  # deterministic from the seed


def test_t5_pad_positions_depend_on_the_prompt(encoder):
    """T5 runs without an attention mask (as in diffusers), so the positions after a prompt's
    end-of-sequence token carry values that depend on the prompt: the conditioning cannot be
    rebuilt from the real tokens plus zeros; the whole sequence is the conditioning."""
    embeds, _ = encoder.encode(PROMPTS)
    tail = CLIP_TOKENS + len("a red seven in the top left") + 1  # past every prompt's </s>
    assert embeds[:, tail:].abs().amin() > 0
    assert not torch.allclose(embeds[0, tail:], embeds[1, tail:])


def test_dropping_t5_zeros_the_t5_block_and_keeps_clip(encoder):
    no_t5 = build_tiny_text_encoders("tiny", seed=0, drop_t5=True, max_sequence_length=32)
    full, pooled = encoder.encode(PROMPTS)
    embeds, pooled_no_t5 = no_t5.encode(PROMPTS)
    assert torch.equal(embeds[:, :CLIP_TOKENS], full[:, :CLIP_TOKENS])
    assert embeds[:, CLIP_TOKENS:].abs().sum() == 0
    assert torch.equal(pooled_no_t5, pooled)
    assert no_t5.sequence_length == CLIP_TOKENS + 32


def test_local_sd3_folder_round_trip(tmp_path, encoder):
    pipe = encoder.pipe
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
        getattr(pipe, name).save_pretrained(tmp_path / name)
    from ladd_ds.models.registry import build_transformer

    build_transformer("tiny").save_pretrained(tmp_path / "transformer")
    loaded = load_sd3_text_encoders(tmp_path, max_sequence_length=32)
    assert isinstance(loaded.pipe.tokenizer, CLIPTokenizer)
    torch.testing.assert_close(loaded.encode(PROMPTS)[0], encoder.encode(PROMPTS)[0])
    assert load_sd3_text_encoders(tmp_path, drop_t5=True).pipe.text_encoder_3 is None


def test_folder_without_encoders_is_rejected(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ValueError, match=r"lacks tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3"):
        load_sd3_text_encoders(tmp_path)


def test_word_vocabulary_gives_one_token_per_known_word(tmp_path):
    from ladd_ds.demo.digits import PROMPT_WORDS

    words = build_tiny_text_encoders("tiny", seed=0, drop_t5=True, max_sequence_length=0, clip_tokens=12, words=PROMPT_WORDS)
    tok = words.pipe.tokenizer
    prompt = "a yellow seven in the bottom right"
    tokens = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    assert tokens[1:-1] == [f"{w}</w>" for w in prompt.split()]  # between start and end: one per word
    unknown = "an owl"  # words outside the vocabulary still tokenize, byte by byte
    assert tok.decode(tok(unknown)["input_ids"], skip_special_tokens=True).strip() == unknown
    assert len(tok(unknown)["input_ids"]) > len(unknown.split()) + 2
    embeds, pooled = words.encode([prompt, "a blue seven in the bottom right"])
    assert embeds.shape[1] == 12 and not torch.allclose(pooled[0], pooled[1])
    # The tokenizer the pipeline saves is the one it loads back (a teacher folder keeps it).
    tok.save_pretrained(tmp_path / "tokenizer")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert again(prompt)["input_ids"] == tok(prompt)["input_ids"]


def test_synth_seed_seeds_no_weights():
    """synth.seed draws buckets and noise only: the tiny text encoders and VAE are initialized
    from text.seed and codec.seed, so a new synth.seed keeps the conditioning and the codec."""
    from ladd_ds.config import load_config
    from ladd_ds.models.codec import load_codec
    from ladd_ds.sampling import load_text_encoder
    from tests.conftest import TINY_CONFIG

    def conditioning_and_codec(*sets):
        cfg = load_config(TINY_CONFIG, ["text.max_sequence_length=8", *sets])
        embeds = load_text_encoder(cfg, "cpu").encode(["a red seven"])[0]
        codec = load_codec(cfg.codec.vae, 4, seed=cfg.codec.seed)
        return embeds, torch.cat([p.flatten() for p in codec.vae.parameters()])

    base = conditioning_and_codec()
    other_synth = conditioning_and_codec("synth.seed=5")
    for a, b in zip(base, other_synth):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(base[0], conditioning_and_codec("text.seed=5")[0])
    assert not torch.equal(base[1], conditioning_and_codec("codec.seed=5")[1])

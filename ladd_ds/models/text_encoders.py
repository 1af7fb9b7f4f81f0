"""SD3 text conditioning: prompt -> (prompt_embeds, pooled), through diffusers' own
`StableDiffusion3Pipeline.encode_prompt` (CLIP-L and CLIP-G penultimate states concatenated and
zero-padded to the T5 width, then T5 tokens along the sequence; pooled = CLIP-L ++ CLIP-G pooled).

Two sources of encoders, neither downloads anything:
- `load_sd3_text_encoders(folder)`: the text_encoder, text_encoder_2, text_encoder_3 and
  tokenizers of a local diffusers SD3 folder (`drop_t5=True` skips the 4.7B T5, as SD3 allows);
- `build_tiny_text_encoders(...)`: tiny CLIP/CLIP/T5 models built from transformers configs with
  byte-level tokenizers written locally, matching the `tiny` transformer preset (text width 32,
  pooled 16), for tests and the CPU demo.

`SD3TextEncoder.encode` is the one text conditioning of ladd_ds: what synth generates with, what
the shards store, and what training, DPO, previews and sampling feed. It is exactly what the
diffusers SD3 pipeline builds: 77 CLIP tokens followed by `max_sequence_length` T5 tokens (T5 runs
without an attention mask, so its pad positions carry prompt-dependent values and cannot be
rebuilt from the real tokens). docs/data.md, "Text conditioning", gives the storage cost.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import tokenizers
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from ladd_ds.core.errors import InputError
from ladd_ds.models.registry import resolve_model_config, transformer_from_config

CLIP_TOKENS = 77  # CLIP's context length: the first 77 tokens of SD3's prompt_embeds


class SD3TextEncoder:
    """Encodes prompts with SD3's three encoders via the diffusers pipeline's encode_prompt."""

    def __init__(self, pipe: StableDiffusion3Pipeline, *, joint_dim: int, max_sequence_length: int = 256):
        self.pipe = pipe
        self.joint_dim = joint_dim
        self.max_sequence_length = max_sequence_length  # T5 tokens (diffusers' max_sequence_length)

    @property
    def clip_tokens(self) -> int:
        """Length of the CLIP part of prompt_embeds (77 for SD3; the demo's encoders use less)."""
        return self.pipe.tokenizer_max_length

    @property
    def has_t5(self) -> bool:
        return self.pipe.text_encoder_3 is not None

    @property
    def pooled_dim(self) -> int:
        return self.pipe.text_encoder.config.projection_dim + self.pipe.text_encoder_2.config.projection_dim

    def to(self, device, dtype: torch.dtype | None = None) -> SD3TextEncoder:
        for enc in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
            if enc is not None:
                enc.to(device=device, dtype=dtype)
        return self

    @property
    def sequence_length(self) -> int:
        """Tokens of prompt_embeds: CLIP's context plus max_sequence_length."""
        return self.clip_tokens + self.max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's conditioning, (B, clip_tokens + max_sequence_length, D) and (B, P), in the
        encoders' dtype; without T5 the T5 block is zeros, as diffusers does (SD3 was trained
        with T5 dropout).

        One prompt at a time: matrix kernels round differently for different batch sizes, so a
        batched call would make a prompt's conditioning depend (in the last bits) on the prompts
        next to it. The encoders cost little next to the transformer's many steps."""
        out = [
            self.pipe.encode_prompt(
                prompt=[prompt],
                prompt_2=None,
                prompt_3=None,
                device=torch.device(device),
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            for prompt in prompts
        ]
        return torch.cat([o[0] for o in out]), torch.cat([o[2] for o in out])


def _meta_transformer(transformer_config: dict):
    """diffusers' encode_prompt reads the T5 width from pipe.transformer.config when T5 is
    dropped; a structure-only (meta device) transformer provides it without any weights."""

    return transformer_from_config(transformer_config, meta=True)


def load_sd3_text_encoders(
    folder: str | Path, drop_t5: bool = False, dtype=torch.float32, max_sequence_length: int = 256
) -> SD3TextEncoder:
    """The three text encoders and tokenizers of a local diffusers SD3 folder."""

    folder = Path(folder)
    needed = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"] + (
        [] if drop_t5 else ["text_encoder_3", "tokenizer_3"]
    )
    missing = [n for n in needed if not (folder / n).is_dir()]
    if missing:
        raise InputError(
            f"SD3 folder {folder} lacks {', '.join(missing)}" + ("" if drop_t5 else " (or set drop_t5 to run without T5)")
        )
    transformer_config = resolve_model_config(str(folder))
    pipe = StableDiffusion3Pipeline(
        transformer=_meta_transformer(transformer_config),
        scheduler=None,
        vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=None if drop_t5 else T5EncoderModel.from_pretrained(folder / "text_encoder_3", dtype=dtype),
        tokenizer_3=None if drop_t5 else T5TokenizerFast.from_pretrained(folder / "tokenizer_3"),
    )
    return SD3TextEncoder(pipe, joint_dim=transformer_config["joint_attention_dim"], max_sequence_length=max_sequence_length)


def _write_byte_level_vocab(folder: Path, specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges (one token per byte): enough for a tokenizer
    that round-trips any prompt, written locally instead of downloaded."""
    chars = list(bytes_to_unicode().values())
    tokens = specials + chars + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def _write_word_vocab(folder: Path, specials: list[str], words: list[str]) -> dict[str, int]:
    """The byte-level vocabulary plus BPE merges learned (by the `tokenizers` library's BPE
    trainer) on `words`, so that each of them is one token and any other text still tokenizes
    byte by byte. CLIP's convention: the last symbol of a word carries the "</w>" suffix."""

    chars = list(bytes_to_unicode().values())
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=specials, initial_alphabet=chars, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(sorted(set(words)), trainer)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokens = specials + chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def _tiny_clip(folder: Path, hidden: int, projection: int, seed: int, context: int = CLIP_TOKENS, words=None):
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = _write_word_vocab(folder, specials, words) if words else _write_byte_level_vocab(folder, specials)
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=context
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=context,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def _tiny_t5(folder: Path, d_model: int, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_byte_level_vocab(folder, ["<pad>", "</s>", "<unk>"])
    bpe = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval(), tokenizer


def build_tiny_text_encoders(
    transformer_preset: str = "tiny",
    *,
    seed: int = 0,
    drop_t5: bool = False,
    max_sequence_length: int = 32,
    clip_tokens: int = CLIP_TOKENS,
    words: list[str] | None = None,
) -> SD3TextEncoder:
    """Tiny SD3-shaped encoders for a preset: two CLIPs of width joint_dim / 2 whose projections
    add up to the pooled width, and a T5 of width joint_dim. Random weights from `seed`.
    `clip_tokens`: the CLIPs' context length (SD3: 77; the CPU demo uses a shorter one).
    `words`: a closed vocabulary (the CPU demo's prompt words) whose words get one CLIP token
    each instead of one per byte, so that prompts need far fewer tokens."""

    cfg = resolve_model_config(transformer_preset)
    joint, pooled = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    if joint % 2 or pooled % 2:
        raise InputError(f"preset {transformer_preset}: joint_attention_dim and pooled_projection_dim must be even")
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        root = Path(tmp)
        clip_l, tok_l = _tiny_clip(root / "clip_l", joint // 2, pooled // 2, seed, clip_tokens, words)
        clip_g, tok_g = _tiny_clip(root / "clip_g", joint // 2, pooled // 2, seed + 1, clip_tokens, words)
        t5, tok_t5 = (None, None) if drop_t5 else _tiny_t5(root / "t5", joint, seed + 2)
    pipe = StableDiffusion3Pipeline(
        transformer=_meta_transformer(cfg),
        scheduler=None,
        vae=None,
        text_encoder=clip_l,
        tokenizer=tok_l,
        text_encoder_2=clip_g,
        tokenizer_2=tok_g,
        text_encoder_3=t5,
        tokenizer_3=tok_t5,
    )
    return SD3TextEncoder(pipe, joint_dim=joint, max_sequence_length=max_sequence_length)


def text_encoders_from_spec(spec: str, model: str, *, drop_t5: bool, max_sequence_length: int, seed: int) -> SD3TextEncoder:
    """`spec` "tiny": the tiny encoders of preset or folder `model` (seeded); else an SD3 folder's."""
    if spec == "tiny":
        return build_tiny_text_encoders(model, seed=seed, drop_t5=drop_t5, max_sequence_length=max_sequence_length)
    return load_sd3_text_encoders(spec, drop_t5=drop_t5, max_sequence_length=max_sequence_length)

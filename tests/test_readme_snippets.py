"""The documentation's code blocks that load exports in diffusers run as written: each block marked
`<!-- tested: tests/test_readme_snippets.py, NAME -->` is taken from README.md or docs/*.md (the
DPO blocks are in docs/dpo.md), its placeholder paths (and nothing else) replaced by exports of
tiny runs made here, executed, and what it loaded compared with the files the export wrote."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.test_dpo import DPO_CONFIG, write_random_pairs

MARKER = "<!-- tested: tests/test_readme_snippets.py, {name} -->"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_block(name: str) -> str:
    """The python block right after the block's marker in README.md or docs/*.md; fails if the
    marker is not there exactly once in all of them or is not followed by a python block."""
    marker = MARKER.format(name=name)
    found = [(doc, doc.read_text()) for doc in DOCS if marker in doc.read_text()]
    counts = {doc.name: text.count(marker) for doc, text in found}
    assert sum(counts.values()) == 1, f"expected the marker {marker!r} once in README.md and docs/*.md, found {counts}"
    ((doc, text),) = found
    after = text[text.index(marker) + len(marker) :]
    m = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert m, f"{doc.relative_to(REPO)}: the marker {marker!r} is not followed by a ```python block"
    return m.group(1)


def run_block(name: str, paths: dict[str, str]) -> dict:
    """Execute the documented block `name` with each placeholder string literal ("path/to/export") replaced
    by the real path; returns the block's variables."""
    code = readme_block(name)
    for placeholder, real in paths.items():
        literal = f'"{placeholder}"'
        assert code.count(literal) == 1, f"documented block {name}: expected the placeholder {literal} once"
        code = code.replace(literal, repr(str(real)))
    namespace: dict = {}
    exec(compile(code, f"docs[{name}]", "exec"), namespace)
    return namespace


def transformer_files(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((folder / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_equals_files(model, folder):
    want = transformer_files(folder)
    state = model.state_dict()
    assert state.keys() == want.keys()
    for key, tensor in want.items():
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], tensor.to(torch.bfloat16)), key


def test_student_export_loads_as_written(tiny_ladd_run, tmp_path):
    out = tmp_path / "student"
    run_cli("export", "--run", str(tiny_ladd_run), "--out", str(out), launcher="in-process")  # bf16, the default
    loaded = run_block("export-student", {"path/to/export": out})
    assert_equals_files(loaded["student"], out)


@pytest.fixture(scope="module")
def dpo_export(tmp_path_factory):
    """A tiny LoRA DPO run of 1 step exported with --merge (the LoRA and the merged model), and its
    teacher (the `tiny` preset the run starts from) as a diffusers folder."""
    from ladd_ds.models.registry import build_transformer

    root = tmp_path_factory.mktemp("readme_dpo")
    pairs = write_random_pairs(root / "pairs")
    sets = [f"data.path={pairs}", "data.micro_batch_size=8", "logging.progress_bar=false"]
    args = ["dpo", "--config", str(DPO_CONFIG), "--run-dir", str(root / "run"), "--max-steps", "1"]
    run_cli(*args, *[a for s in sets for a in ("--set", s)], launcher="in-process")
    run_cli("export", "--run", str(root / "run"), "--out", str(root / "export"), "--merge", launcher="in-process")
    build_transformer("tiny", seed=0).save_pretrained(root / "teacher" / "transformer")
    return root / "teacher", root / "export"


def test_dpo_lora_loads_as_written(dpo_export):
    from peft.utils import get_peft_model_state_dict

    teacher, export = dpo_export
    loaded = run_block("dpo-lora", {"path/to/teacher": teacher, "dpo_export": export})
    transformer = loaded["transformer"]
    # The adapter's weights are the file's, under diffusers' adapter name, at the exported scale.
    want = {k.removeprefix("transformer."): v for k, v in load_file(export / "lora" / "pytorch_lora_weights.safetensors").items()}
    (adapter,) = transformer.peft_config
    got = get_peft_model_state_dict(transformer, adapter_name=adapter)
    assert got.keys() == want.keys()
    assert any(v.abs().max() > 0 for k, v in want.items() if "lora_B" in k)  # trained: not peft's zero init
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor.to(got[key].dtype)), key  # in the dtype diffusers gave it
    config = json.loads((export / "lora" / "adapter_config.json").read_text())
    layer = next(m for n, m in transformer.named_modules() if n.endswith("attn.to_q"))
    assert layer.scaling[adapter] == config["lora_alpha"] / config["r"]
    # The base weights are the teacher's.
    base = transformer_files(teacher)
    state = transformer.state_dict()
    for key, tensor in base.items():
        name = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), key


def test_dpo_merged_model_loads_as_written(dpo_export):
    _, export = dpo_export
    loaded = run_block("dpo-merged", {"dpo_export": export})
    assert_equals_files(loaded["model"], export)

"""Loading a local diffusers folder outside ZeRO-3 (registry.load_folder_transformer): the same
model as diffusers' from_pretrained in fp32 and bf16, its errors, and the host memory it takes."""

import json
import re
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from ladd_ds.core.errors import InputError
from ladd_ds.models.registry import PRESETS, build_transformer, transformer_from_config
from tests.conftest import REPO, subprocess_env

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg, dtype = model.config, model.dtype
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, cfg.in_channels, 16, 16, generator=g).to(dtype),
            encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g).to(dtype),
            timestep=torch.tensor([250.0, 750.0]),
            return_dict=False,
        )[0]


def _folder(path, config, seed=3, **save):
    torch.manual_seed(seed)
    transformer_from_config(config).save_pretrained(path / "transformer", **save)
    return path


def _from_pretrained(folder):
    return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)


@pytest.mark.parametrize("shards", ["single", "sharded"])
def test_a_folder_loads_as_from_pretrained_in_fp32_and_bf16(tmp_path, shards):
    """fp32: the same tensors and velocity as from_pretrained; bf16: those of from_pretrained
    cast to bf16, every floating buffer included, on the requested device with no meta left."""
    save = {"max_shard_size": "100KB"} if shards == "sharded" else {}
    folder = _folder(tmp_path, PRESETS["tiny"], **save)
    if shards == "sharded":
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reference = _from_pretrained(folder)
    for dtype in (torch.float32, torch.bfloat16):  # fp32 first: bfloat16() casts the reference in place
        loaded = build_transformer(str(folder), seed=99, dtype=dtype)
        expected = reference.bfloat16() if dtype == torch.bfloat16 else reference
        assert not loaded.training and loaded.dtype == dtype
        state = loaded.state_dict()
        assert list(state) == list(expected.state_dict())
        for name, tensor in expected.state_dict().items():
            assert state[name].device.type == "cpu" and torch.equal(state[name], tensor), (dtype, name)
        assert all(p.requires_grad for p in loaded.parameters())
        assert torch.equal(_forward(loaded), _forward(expected)), dtype


def test_a_positional_embedding_that_is_not_saved_is_computed(tmp_path):
    """Without pos_embed_max_size, PatchEmbed's positions are a non-persistent buffer: not in the
    file, computed at init. The loaded model has it, in the loading dtype, and the velocity of
    from_pretrained."""
    folder = _folder(tmp_path, dict(PRESETS["tiny"], pos_embed_max_size=None))
    assert "pos_embed.pos_embed" not in load_file(folder / WEIGHTS)
    reference = _from_pretrained(folder)
    loaded = build_transformer(str(folder))
    assert torch.equal(loaded.pos_embed.pos_embed, reference.pos_embed.pos_embed)
    assert torch.equal(_forward(loaded), _forward(reference))
    bf16 = build_transformer(str(folder), dtype=torch.bfloat16)
    assert bf16.pos_embed.pos_embed.dtype == torch.bfloat16
    torch.testing.assert_close(_forward(bf16).float(), _forward(reference.bfloat16()).float())


def test_folder_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = _folder(tmp_path, PRESETS["tiny"])
    state = load_file(folder / WEIGHTS)
    without_bias = {k: v for k, v in state.items() if k != "proj_out.bias"}
    bad = [
        (without_bias, r"missing \['proj_out.bias'\], unexpected \[\]"),
        ({**state, "extra.weight": torch.zeros(2)}, r"missing \[\], unexpected \['extra.weight'\]"),
        ({**state, "proj_out.bias": torch.zeros(3)}, r"proj_out.bias in .* has shape \(3,\), its config.json makes it \(16,\)"),
    ]
    for weights, message in bad:
        save_file(weights, folder / WEIGHTS)
        with pytest.raises(InputError, match=f"model folder {re.escape(str(folder))}: .*{message}"):
            build_transformer(str(folder), dtype=torch.bfloat16)
    (folder / WEIGHTS).unlink()
    with pytest.raises(InputError, match="no diffusion_pytorch_model.safetensors .*safe_serialization=True"):
        build_transformer(str(folder))


# Runs in a fresh interpreter: the peak host RSS (VmHWM) while one path builds the model, above
# the RSS after the imports. Resetting the peak first (clear_refs 5) keeps the imports' transient
# peak out; where that is not allowed, the measure can only come out too high.
MEASURE = """
import json, sys
import torch
from diffusers import SD3Transformer2DModel
import ladd_ds.distributed.engines  # deepspeed, which build_flow_model imports
from ladd_ds.models.flow_model import build_flow_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

folder, path = sys.argv[1], sys.argv[2]
baseline = status("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
if path == "new":  # what a ZeRO-2 (or replicated) engine is given in a bf16 run
    model = build_flow_model(folder, seed=0, ds_config={"zero_optimization": {"stage": 2}}, dtype=torch.bfloat16).transformer
else:  # before: from_pretrained in fp32, cast by the bf16 engine on the host
    model = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32).bfloat16()
assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
bf16_bytes = sum(t.numel() for t in model.state_dict().values()) * 2
print(json.dumps({"increase": status("VmHWM") - baseline, "bf16_bytes": bf16_bytes}))
"""


def test_loading_a_folder_in_bf16_peaks_near_one_bf16_copy_on_the_host(tmp_path):
    """Host peak RSS while a folder saved in fp32 is loaded for a bf16 engine on a CPU rank: at
    most 1.3x the model's bf16 bytes (the model itself, as a CPU rank's engine holds it, plus one
    tensor read from the memory-mapped file). Per rank is the bound that matters: a replicated or
    ZeRO-2 model is a copy per rank by definition, so a node holds ranks x this (on a GPU the
    model goes to the device and the host holds one tensor). The fp32 from_pretrained path that
    loading replaced must exceed the bound, or the test would prove nothing. Ratios: `pytest -s`."""
    # tiny widened to 512 (8 heads x 64), 4 blocks: 36M parameters (137 MiB in fp32).
    config = dict(PRESETS["tiny"], num_layers=4, attention_head_dim=64, num_attention_heads=8)
    config.update(joint_attention_dim=512, caption_projection_dim=512, pooled_projection_dim=64)
    folder = _folder(tmp_path, config)
    env = dict(subprocess_env(), CUDA_VISIBLE_DEVICES="")  # the host's memory: keep the model there
    procs = {
        path: subprocess.Popen(
            [sys.executable, "-c", MEASURE, str(folder), path], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for path in ("new", "old")
    }
    ratios = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        measured = json.loads(out.decode().strip().splitlines()[-1])
        ratios[path] = measured["increase"] / measured["bf16_bytes"]
    print(f"\nhost peak RSS while loading / the model's bf16 bytes: {ratios['new']:.2f} (fp32 path: {ratios['old']:.2f})")
    assert ratios["new"] <= 1.3, f"loading in bf16 peaked at {ratios['new']:.2f}x the bf16 model (bound 1.3x)"
    assert ratios["old"] > 2.0, f"the fp32 path peaked at only {ratios['old']:.2f}x the bf16 model"


def test_zero2_engines_train_a_folder_loaded_in_bf16(tmp_path, distributed_world_of_one):
    """A bf16 LADD run with a folder teacher on ZeRO-2 (student) and ZeRO-0 (teacher) engines: the
    engines take the models loaded in bf16 on the rank's device, holding the folder's weights as
    from_pretrained cast to bf16 gives them, and a generator step trains the student."""
    from ladd_ds.config import load_config
    from ladd_ds.ladd.method import LADDMethod
    from ladd_ds.training.trainer import Trainer
    from tests.conftest import TINY_CONFIG

    folder = _folder(tmp_path, PRESETS["tiny"])
    sets = [f"run.run_dir={tmp_path / 'run'}", "logging.progress_bar=false", f"model.teacher={folder}"]
    sets += ["deepspeed.precision=bf16", "deepspeed.student_config=ds_configs/cpu/zero2.json"]
    sets += ["deepspeed.teacher_config=ds_configs/cpu/zero0.json"]
    cfg = load_config(TINY_CONFIG, sets)
    trainer = Trainer(cfg, cfg.run.run_dir, LADDMethod)
    method = trainer.method
    assert method.ds_stages == {"student": 2, "heads": 2, "teacher": 0}
    expected = _from_pretrained(folder).bfloat16().state_dict()
    for name in ("student", "teacher"):
        state = getattr(method.engines, name).module.transformer.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items()), name
    batch = method.to_device(next(trainer.batches))
    metrics, _ = method.generator_step(batch, method.draw_noise(batch))
    assert torch.isfinite(torch.as_tensor(float(metrics["loss/generator"])))
    student = method.engines.student.module.transformer.state_dict()
    assert any(not torch.equal(student[k], v) for k, v in expected.items())

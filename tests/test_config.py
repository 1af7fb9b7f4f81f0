"""Bad configs and bad inputs stop with one message that names the file/key, before any engine."""

import numpy as np
import pytest
import yaml
from streaming import MDSWriter

from ladd_ds.config import ConfigError, load_config
from tests.conftest import TINY_CONFIG, cli_error


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY_CONFIG, ["run.seed=7", "ladd.renoise_m=-1", "discriminator.taps=[0, 2]"])
    assert cfg.run.seed == 7 and cfg.ladd.renoise_m == -1.0 and cfg.discriminator.taps == [0, 2]
    assert cfg.model.teacher == "tiny" and cfg.data.source == "random_latents"


@pytest.mark.parametrize(
    "override, message",
    [
        ("ladd.renoise_z=1", r"ladd.renoise_z: unknown key \(known: .*renoise_m"),
        ("data.random_latents.heigth=8", r"data.random_latents.heigth: unknown key"),
        ("optim.student_lr=fast", r"optim.student_lr: expected a number, got 'fast'"),
        ("optim.grad_accum=1.5", r"optim.grad_accum: expected an integer"),
        ("logging.tensorboard=1", r"logging.tensorboard: expected true/false"),
        ("deepspeed.precision=fp8", r"deepspeed.precision: 'fp8' is not one of \['fp32', 'bf16'\]"),
        ("ladd.student_probs=[0.5, 0.5]", r"ladd.student_probs: has 2 entries, ladd.student_timesteps has 4"),
        ("ladd.student_probs=[0.5, 0.5, 0.5, 0.5]", r"ladd.student_probs: probabilities must be >= 0 and sum to 1"),
        ("ladd.warmup_steps=500", r"ladd.warmup_steps > 0 needs ladd.warmup_probs"),
        ("data.source=mds", r"data.path: required when data.source is 'mds'"),
        ("discriminator.taps=[]", r"discriminator.taps: distinct block indices"),
        ("model=3", r"model: expected a mapping"),
        ("model.student=tiny", r"model.student = 'tiny' is a size preset: the student would start from random weights"),
        ("ladd.distill_cfg=0.5", r"ladd.distill_cfg must be >= 1"),
        ("data.compression=lz4", r"data.compression: 'lz4' is not one of .*'zstd'"),
        # The optimizer's values, checked before torch's constructors see them.
        ("optim.student_lr=-1", r"optim.student_lr: must be >= 0, got -1.0"),
        ("optim.heads_lr=-0.5", r"optim.heads_lr: must be >= 0, got -0.5"),
        ("optim.eps=0", r"optim.eps: must be > 0"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas: expected two numbers \[beta1, beta2\], each in \[0, 1\)"),
        ("optim.betas=[-0.1, 0.99]", r"optim.betas: .* each in \[0, 1\)"),
        ("optim.weight_decay=-0.01", r"optim.weight_decay: must be >= 0"),
        ("optim.grad_clip=-1", r"optim.grad_clip: must be >= 0"),
        ("dpo.lr=-1e-4", r"dpo.lr: must be > 0"),
    ],
)
def test_bad_values_name_the_key(override, message, tmp_path):
    """The error names the key, and where its value came from: the --set argument, or the file."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TINY_CONFIG, ["run.seed=3", override])
    assert str(info.value).startswith(f"--set {override}: ")
    # The same value written into the YAML file: the file is named.
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    key, value = override.split("=", 1)
    *sections, last = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = yaml.safe_load(value)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path / "bad.yaml", ["run.seed=3"])
    assert str(info.value).startswith(f"{tmp_path / 'bad.yaml'}: ")


def test_a_random_student_must_be_asked_for():
    cfg = load_config(TINY_CONFIG, ["model.student=tiny", "model.random_init_student=true"])
    assert cfg.model.student == "tiny"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {seed: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(listy)


def test_cli_bad_inputs_stop_before_any_engine(tmp_path, capsys):
    def _cli_error(tmp_path, *sets):
        args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run")]
        err = cli_error(capsys, *args, *[a for s in sets for a in ("--set", s)])
        assert not (tmp_path / "run" / "checkpoints").exists()
        return err

    err = _cli_error(tmp_path, "model.teacher=sd3-huge")
    assert "model 'sd3-huge' is neither a preset (tiny, small, demo, sd3-medium, sd3-large) nor an existing folder" in err
    err = _cli_error(tmp_path, "data.source=mds", f"data.path={tmp_path / 'missing_shards'}")
    assert "missing_shards" in err and "does not exist" in err
    shards = tmp_path / "shards"
    shards.mkdir()
    with MDSWriter(out=str(shards), columns={"latent": "ndarray:float16", "prompt": "str"}) as writer:
        for i in range(8):
            writer.write({"latent": np.zeros((4, 16, 16), np.float16), "prompt": f"p{i}"})
    err = _cli_error(tmp_path, "data.source=mds", f"data.path={shards}")
    assert str(shards) in err and "missing column" in err
    err = _cli_error(tmp_path, "data.random_latents.latent_channels=16")
    assert "data.random_latents.latent_channels=16 does not match the teacher's latent channels=4" in err


@pytest.mark.parametrize("name", ["sd3_medium.yaml", "sd3_large.yaml"])
def test_sd3_configs_carry_the_high_resolution_warm_up(name):
    cfg = load_config(TINY_CONFIG.parent / name)
    assert cfg.deepspeed.precision == "bf16"
    assert cfg.ladd.warmup_probs == [0.0, 0.0, 0.5, 0.5] and cfg.ladd.warmup_steps == 500

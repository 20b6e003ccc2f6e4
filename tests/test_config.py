"""Config tree, presets, overrides and their error messages."""
import subprocess
import sys

import pytest

from ivfast.config import Config, ConfigError, dump, from_dict, load_config, presets, save_config

PRESETS = ["demo", "stage1_vitb", "stage1_vitl", "stage2_vitb", "stage2_vitl"]


def test_presets_exist_and_load():
    assert set(PRESETS) <= set(presets())
    for name in PRESETS:
        assert isinstance(load_config(name), Config)


def test_paper_numbers_in_presets():
    s1, s2, l1 = load_config("stage1_vitb"), load_config("stage2_vitb"), load_config("stage1_vitl")
    assert (s1.model.encoder.dim, s1.model.encoder.depth, s1.model.encoder.heads) == (768, 12, 12)
    assert (l1.model.encoder.dim, l1.model.encoder.depth, l1.model.encoder.heads) == (1024, 24, 16)
    assert (s1.model.decoder.depth, s1.model.decoder.width) == (6, 1536)
    assert s1.model.predictor.layers == 5 and s1.model.num_frames == 16
    assert s1.optim.base_lr == 1e-3 and s1.optim.weight_decay == 0.05 and s1.optim.global_batch == 2048
    assert s2.stage == 2 and s2.model.num_frames == 32 and s2.optim.base_lr == 1e-4
    assert s2.optim.warmup_epochs == 0 and s2.masking.kind == "multiblock"
    assert [b.num_blocks for b in s2.masking.blocks] == [8, 2]
    assert load_config("stage2_vitl").optim.global_batch == 1024


def test_overrides_are_typed():
    cfg = load_config("demo", ["optim.base_lr=3e-4", "model.encoder.depth=5", "data.flip=false",
                               "masking.blocks=[{num_blocks: 4}]", "stage=2"])
    assert cfg.optim.base_lr == 3e-4 and cfg.model.encoder.depth == 5 and cfg.data.flip is False
    assert cfg.masking.blocks[0].num_blocks == 4 and cfg.stage == 2


@pytest.mark.parametrize("override, fragment", [
    ("model.encoder.dimm=3", "valid keys there"),
    ("modell.x=1", "'modell' is not in the top level"),
    ("masking.kind=random", "choose one of ['semantic', 'tube', 'multiblock']"),
    ("optim.base_lr=fast", "optim.base_lr: expected a number"),
    ("model.encoder.depth=2.5", "expected an integer"),
    ("data.flip=maybe", "expected true or false"),
    ("optim.lr.x=1", "'lr' is not in optim"),
    ("model.encoder=3", "expected a mapping"),
    ("masking.ratio=1.5", "masking.ratio must be in (0, 1)"),
    ("runtime.profile_steps=5", "A:B"),
    ("noequals", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("stage1_vitb", [override])
    assert fragment in str(e.value)


def test_string_values_are_taken_as_typed():
    cfg = load_config("demo", ["runtime.profile_steps=20:30", "runtime.output_dir=0123", "data.train_list=yes"])
    assert (cfg.runtime.profile_steps, cfg.runtime.output_dir, cfg.data.train_list) == ("20:30", "0123", "yes")


@pytest.mark.parametrize("override", ["runtime.ckpt_every=0", "runtime.log_every=0", "runtime.max_nonfinite=0",
                                      "optim.epochs=0", "optim.warmup_epochs=-1", "optim.clip_grad=-1",
                                      "masking.max_keep=-5", "optim.base_lr=nan", "runtime.dtype=fp16"])
def test_out_of_range_values_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("demo", [override])


@pytest.mark.parametrize("key, value, fix", [
    ("data.num_frames", "8", "the loader reads model.num_frames: delete the key, set model.num_frames"),
    ("data.img_size", "112", "the loader reads model.img_size: delete the key, set model.img_size"),
    ("model.stage2_head", "linear", "the stage-2 head is always the released MLP: delete the key"),
])
def test_removed_keys_say_what_to_do(tmp_path, key, value, fix):
    """One key each for frames and image size (the model's; the loader reads them), no head
    switch: setting a removed key, by override or in a YAML file, fails with one line naming the fix."""
    want = f"{key} was removed: {fix}"
    with pytest.raises(ConfigError) as e:
        load_config("demo", [f"{key}={value}"])
    assert str(e.value) == want
    section, name = key.split(".")
    yml = tmp_path / "old.yaml"
    yml.write_text(f"base: demo\n{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(yml))
    assert str(e.value) == want


def test_frames_and_size_are_the_model_keys():
    cfg = load_config("demo", ["model.num_frames=8", "model.img_size=112"])
    assert not hasattr(cfg.data, "num_frames") and not hasattr(cfg.data, "img_size")
    assert (cfg.model.num_frames, cfg.model.img_size) == (8, 112)


def test_unknown_preset_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="stage1_vitb"):
        load_config("stage3_vitz")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder:\n    widht: 3\n")
    with pytest.raises(ConfigError, match="model.encoder.widht"):
        load_config(str(bad))


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config("stage2_vitb", ["runtime.seed=7"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg
    assert from_dict({}) == Config()
    assert "multiblock" in dump(cfg)


def test_cli_print_config_and_errors():
    out = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", "stage1_vitb",
                          "optim.base_lr=2e-3", "--profile-steps", "20:30", "--print-config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "base_lr: 0.002" in out.stdout and "profile_steps: '20:30'" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", "stage1_vitb",
                          "optim.bogus=1", "--print-config"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.bogus" in bad.stderr and "Traceback" not in bad.stderr


def test_presets_print_the_released_recipe():
    """The stage-1 / stage-2 presets' --print-config show the released values."""
    def printed(name):
        out = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", name, "--print-config"],
                             capture_output=True, text=True, check=True).stdout
        return from_dict(__import__("yaml").safe_load(out))
    s1, s2 = printed("stage1_vitb"), printed("stage2_vitb")
    assert s1.model.decoder.dtype == "fp32"                      # forward_diff_loss under fp32 autocast
    assert s2.masking.predict == "unseen"                        # every position the encoder did not see
    assert (s2.model.stage2_pos, s2.model.stage2_pos_frames) == ("reinterpolate", 16)
    assert (s2.optim.global_batch, s2.optim.batch_per_gpu) == (1792, 14)   # 14 x 128 GPUs, lr x 7
    assert [b.num_blocks for b in s2.masking.blocks] == [8, 2] and s2.masking.max_keep == 1600
    assert load_config("stage2_vitl").optim.global_batch == 1024


def test_stage2_pos_frames_checked():
    with pytest.raises(ConfigError, match="stage2_pos_frames"):
        load_config("stage2_vitb", ["model.stage2_pos_frames=0"])


def test_base_chain_loop_is_a_config_error(tmp_path):
    """Two presets whose `base:` names each other stop with a ConfigError naming the loop."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\noptim: {{base_lr: 1.0e-3}}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="'base' chain loops through"):
        load_config(str(a))


def test_a_checkpoint_config_from_before_the_key_removals_still_loads(tmp_path):
    """A config.yaml saved with data.num_frames / data.img_size / model.stage2_head (removed keys
    that held no information of their own) loads for checkpoints; a user config that sets them fails."""
    import yaml
    from ivfast.config import ConfigError, load_config, load_saved_config, to_dict
    old = to_dict(load_config("stage2_vitb"))
    old["data"].update(num_frames=old["model"]["num_frames"], img_size=old["model"]["img_size"])
    old["model"]["stage2_head"] = "mlp"
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(old))
    cfg = load_saved_config(f)
    assert (cfg.model.num_frames, cfg.model.img_size) == (old["model"]["num_frames"], old["model"]["img_size"])
    with pytest.raises(ConfigError, match=r"data\.(num_frames|img_size) was removed"):
        load_config(str(f))

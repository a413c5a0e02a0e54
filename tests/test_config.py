"""Recipes, overrides and the messages for impossible settings."""

from pathlib import Path

import pytest
import yaml

from lowmem_moco.config import ConfigError, config_from_dict, load_config, save_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


def test_official_imagenet_recipe_keeps_the_published_hyper_parameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes/imagenet_resnet50_mocov2.yaml")
    assert (cfg.train.batch_size, cfg.moco.queue_size, cfg.train.lr, cfg.moco.temperature) == (256, 65536, 0.03, 0.2)
    assert cfg.micro_batch * cfg.accum_steps == 256


def test_overrides_are_typed_and_layered_over_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 3, lr: 0.1}\nmodel: {arch: resnet50}\n")
    cfg = load_config(recipe, ["train.lr=0.5", "train.micro_batch_size=64", "moco.symmetric=true", "train.lr=1"])
    assert cfg.train.epochs == 3 and cfg.model.arch == "resnet50"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.micro_batch == 64 and cfg.accum_steps == 4 and cfg.moco.symmetric is True


def test_timm_kwargs_take_free_form_entries_from_recipe_and_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  timm_kwargs:\n    channels: [16, 32, 64, 128]\n    block_args: {attn_layer: se}\n")
    cfg = load_config(recipe, ["model.timm_kwargs.zero_init_last=false"])
    assert cfg.model.timm_kwargs == {"channels": [16, 32, 64, 128], "block_args": {"attn_layer": "se"},
                                     "zero_init_last": False}
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert load_config().model.timm_kwargs == {}  # defaults are not shared between configs
    with pytest.raises(ConfigError, match="model.timm_kwargs must be a mapping"):
        load_config(None, ["model.timm_kwargs=3"])


@pytest.mark.parametrize("override,words", [
    ("moco.queu_size=10", ["unknown key 'moco.queu_size'", "moco.queue_size"]),
    ("train.lr=fast", ["train.lr must be float", "'fast'"]),
    ("train.epochs=2.5", ["train.epochs must be int"]),
    ("train.channels_last=1", ["must be bool"]),
    ("train.micro_batch_size=48", ["not a multiple", "train.micro_batch_size=32"]),
    ("moco.key_chunks=512", ["more than the 256 keys"]),
    ("moco.key_chunks=5", ["equal chunks"]),
    ("moco.queue_size=100", ["smaller than the 256 keys", "at least 256"]),
    ("train.precision=fp8", ["train.precision must be one of no, fp16, bf16"]),
    ("data.source=imagenet", ["data.source must be one of"]),
    ("train.epochs", ["must look like key=value"]),
    ("train=3", ["is a section"]),
])
def test_bad_settings_get_one_clear_message(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value)


def test_recipe_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epohcs' \(in .*typo.yaml\); did you mean 'train.epochs'"):
        load_config(typo)

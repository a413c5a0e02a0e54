"""Recipes, overrides and the messages for impossible settings."""

from pathlib import Path

import pytest
import yaml

from lowmem_moco.cli import main
from lowmem_moco.config import ALIASES, CHOICES, ConfigError, config_from_dict, get_key, load_config, save_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


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


DOCUMENTED = [(key, value) for key, values in CHOICES.items() for value in values] + \
    [(key, alias) for key, aliases in ALIASES.items() for alias in aliases if isinstance(alias, str)]


@pytest.mark.parametrize("key,value", DOCUMENTED, ids=lambda v: str(v))
def test_every_documented_value_of_every_enumerated_key_works_from_command_line_and_recipe(key, value, tmp_path):
    expected = ALIASES.get(key, {}).get(value, value)
    section, name = key.split(".")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{section}:\n  {name}: {value}\n")  # unquoted: YAML turns no/off into booleans
    assert get_key(load_config(recipe), key) == expected
    assert get_key(load_config(None, [f"{key}={value}"]), key) == expected
    quoted = tmp_path / "q.yaml"
    quoted.write_text(f"{section}:\n  {name}: '{value}'\n")
    assert get_key(load_config(quoted), key) == expected


def test_booleans_written_as_words_and_bad_enumerations_are_named():
    cfg = load_config(None, ["train.channels_last=yes", "moco.symmetric=off", "train.precision=FP32"])
    assert (cfg.train.channels_last, cfg.moco.symmetric, cfg.train.precision) == (True, False, "no")
    with pytest.raises(ConfigError, match=r"data.augment must be one of auto, per_image, batched; got False"):
        load_config(None, ["data.augment=no"])
    with pytest.raises(ConfigError, match=r"model.head must be one of mlp, linear; got 'mlp2'"):
        load_config(None, ["model.head=mlp2"])


@pytest.mark.parametrize("override,words", [
    ("augment.crop_scale=[0,1]", "augment.crop_scale must be [low, high] with 0 < low <= high <= 1"),
    ("augment.crop_scale=[0.5,0.2]", "augment.crop_scale must be [low, high]"),
    ("augment.crop_ratio=[1.3,0.7]", "augment.crop_ratio must be [low, high] with 0 < low <= high"),
    ("augment.blur_sigma=[0,2]", "augment.blur_sigma must be [low, high] with 0 < low <= high"),
    ("augment.blur_sigma=0.5", "augment.blur_sigma must be a list of numbers"),
    ("augment.jitter=[0.4,0.4,0.4]", "augment.jitter must hold 4 numbers"),
    ("augment.jitter=[0.4,-1,0.4,0.1]", "augment.jitter (contrast) must be >= 0"),
    ("augment.jitter=[0.4,0.4,0.4,0.6]", "augment.jitter (hue) must be in [0, 0.5]"),
    ("augment.blur_prob=1.5", "augment.blur_prob must be a probability in [0, 1]"),
    ("augment.flip_prob=-0.1", "augment.flip_prob must be a probability in [0, 1]"),
    ("augment.std=[0.2,0,0.2]", "augment.std must be positive"),
    ("augment.blur_max_radius=-1", "augment.blur_max_radius must be >= 0"),
    ("eval.knn_max_train=-5", "eval.knn_max_train must be >= 0"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1)"),
])
def test_out_of_range_augmentation_and_eval_settings_get_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_config_command_prints_the_resolved_config_and_validates(capsys):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes/cifar10_resnet18.yaml")
    assert main(["config", recipe, "train.precision=fp32", "augment.blur_prob=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(recipe, ["train.precision=no", "augment.blur_prob=0.5"]).to_dict()
    assert printed["train"]["precision"] == "no" and printed["augment"]["crop_scale"] == [0.08, 1.0]
    assert main(["config", recipe, "augment.crop_scale=[0.5,0.1]"]) == 2
    assert "augment.crop_scale must be [low, high]" in capsys.readouterr().err
    assert main(["config", recipe, "model.arch=resnt50"]) == 2  # the model checks train makes, before any data
    assert "model.arch 'resnt50' is not a timm model; close names:" in capsys.readouterr().err
    assert main(["config", recipe, "model.arch=convnext_atto"]) == 0
    notes = capsys.readouterr().err  # what a ResNet recipe's settings do (not) to another family
    assert "model.resnet_init=torchvision" in notes and "convnext_atto" in notes

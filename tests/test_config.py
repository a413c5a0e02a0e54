"""Recipes, overrides and the messages for impossible settings."""

import pytest
import yaml

from lowmem_moco.cli import main
from lowmem_moco.config import ALIASES, CHOICES, Config, ConfigError, config_from_dict, get_key, load_config, save_config
from support import RECIPES, missing, raises_naming


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
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
    ("train.lr=fast", ["train.lr", "float", "'fast'"]),
    ("train.epochs=2.5", ["train.epochs", "int", "2.5"]),
    ("train.channels_last=1", ["train.channels_last", "bool"]),
    ("train.micro_batch_size=48", ["train.batch_size (256)", "(48)", "train.micro_batch_size=32"]),
    ("moco.key_chunks=512", ["moco.key_chunks (512)", "256 keys", "moco.key_chunks=8"]),
    ("moco.key_chunks=5", ["moco.key_chunks (5)", "equal chunks", "moco.key_chunks=1"]),
    ("moco.queue_size=100", ["moco.queue_size (100)", "256 keys", "at least 256"]),
    ("train.precision=fp8", ["train.precision", "no, fp16, bf16", "'fp8'"]),
    ("data.source=imagenet", ["data.source", "folder, cifar10", "'imagenet'"]),
    ("train.epochs", ["'train.epochs'", "key=value"]),
    ("train=3", ["'train'", "section", "train.<name>="]),
])
def test_bad_settings_get_one_clear_message(override, words):
    with raises_naming(ConfigError, *words):
        load_config(None, [override])


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
    with raises_naming(ConfigError, "data.augment", "auto, per_image, batched", "False"):
        load_config(None, ["data.augment=no"])
    with raises_naming(ConfigError, "model.head", "mlp, linear", "'mlp2'"):
        load_config(None, ["model.head=mlp2"])


@pytest.mark.parametrize("override,facts", [  # besides the key: the allowed range, and the bad value
    ("augment.crop_scale=[0,1]", ["0 < low <= high <= 1"]),
    ("augment.crop_scale=[0.5,0.2]", ["low <= high", "0.5", "0.2"]),
    ("augment.crop_ratio=[1.3,0.7]", ["0 < low <= high", "1.3", "0.7"]),
    ("augment.blur_sigma=[0,2]", ["0 < low <= high"]),
    ("augment.blur_sigma=0.5", ["list of numbers", "0.5"]),
    ("augment.jitter=[0.4,0.4,0.4]", ["4 numbers"]),
    ("augment.jitter=[0.4,-1,0.4,0.1]", ["(contrast)", ">= 0", "-1"]),
    ("augment.jitter=[0.4,0.4,0.4,0.6]", ["(hue)", "[0, 0.5]", "0.6"]),
    ("augment.blur_prob=1.5", ["[0, 1]", "1.5"]),
    ("augment.flip_prob=-0.1", ["[0, 1]", "-0.1"]),
    ("augment.blur_prob=[1.0,0.1,0.5]", ["[view 1, view 2]", "3 values", "augment.blur_prob=[1.0, 0.5]"]),
    ("augment.solarize_prob=[0,1.2]", ["(view 2)", "[0, 1]", "1.2"]),
    ("augment.solarize_prob=[a,0.2]", ["[view 1, view 2]", "'a'"]),
    ("model.pos_embed=fixed", ["learned, sincos", "fixed"]),
    ("train.optimizer=lamb", ["sgd, adamw, lars", "lamb"]),
    ("augment.std=[0.2,0,0.2]", ["positive"]),
    ("augment.blur_max_radius=-1", [">= 0", "-1"]),
    ("eval.knn_max_train=-5", [">= 0", "-5"]),
    ("data.val_fraction=1", ["[0, 1)", "1"]),
])
def test_out_of_range_augmentation_and_eval_settings_get_one_line(override, facts):
    with raises_naming(ConfigError, override.split("=")[0], *facts) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_per_view_probabilities_load_as_lists_and_single_values_stay_numbers():
    cfg = load_config(None, ["augment.blur_prob=[1.0, 0.1]", "augment.solarize_prob=[0, 0.2]"])
    assert (cfg.augment.blur_prob, cfg.augment.solarize_prob, cfg.augment.flip_prob) == ([1.0, 0.1], [0.0, 0.2], 0.5)
    assert [cfg.augment.for_view(v).blur_prob for v in (0, 1)] == [1.0, 0.1]
    assert cfg.augment.for_view(1).flip_prob == 0.5 and Config().augment.solarize_prob == 0.0


def test_config_command_prints_the_resolved_config_and_validates(capsys):
    recipe = str(RECIPES / "cifar10_resnet18.yaml")
    assert main(["config", recipe, "train.precision=fp32", "augment.blur_prob=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(recipe, ["train.precision=no", "augment.blur_prob=0.5"]).to_dict()
    assert printed["train"]["precision"] == "no" and printed["augment"]["crop_scale"] == [0.08, 1.0]
    assert main(["config", recipe, "augment.crop_scale=[0.5,0.1]"]) == 2
    assert missing(capsys.readouterr().err, "augment.crop_scale", "low <= high") == []
    assert main(["config", recipe, "model.arch=resnt50"]) == 2  # the model checks train makes, before any data
    assert missing(capsys.readouterr().err, "model.arch", "'resnt50'", "resnet50") == []  # a close name
    assert main(["config", recipe, "model.arch=convnext_atto"]) == 0
    notes = capsys.readouterr().err  # what a ResNet recipe's settings do (not) to another family
    assert "model.resnet_init=torchvision" in notes and "convnext_atto" in notes


def test_scientific_notation_without_a_dot_is_a_number_as_users_mean_it(tmp_path):
    """YAML 1.1 reads 1e-4 as the text '1e-4'; a float key takes it as the number, from an override
    or a recipe, and text that is no number is still refused."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  weight_decay: 1e-6\n")
    cfg = load_config(recipe, ["train.lr=1e-4"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-4, 1e-6)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=1e-4x"])

"""The shipped recipes are the settings they cite, field by field."""

import dataclasses
import pytest

from lowmem_moco.config import Config, get_key, load_config
from lowmem_moco.optim import lr_at
from support import RECIPES

# facebookresearch/moco, colab/moco_cifar10_demo.ipynb: the argument cell (args after the notebook's
# own overrides), the data cell (train_transform, CIFAR10(train=True) for training and the memory
# bank, CIFAR10(train=False) for testing), ModelBase/ModelMoCo and adjust_learning_rate.
CIFAR10_NOTEBOOK = {
    "data.source": "cifar10",
    "data.image_size": 32,                      # RandomResizedCrop(32)
    "data.val_fraction": 0.0,                   # trains on all 50,000 images
    "augment.crop_scale": [0.08, 1.0],          # torchvision's default scale
    "augment.crop_ratio": [3 / 4, 4 / 3],
    "augment.flip_prob": 0.5,                   # RandomHorizontalFlip(p=0.5)
    "augment.jitter_prob": 0.8,                 # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    "augment.jitter": [0.4, 0.4, 0.4, 0.1],
    "augment.grayscale_prob": 0.2,              # RandomGrayscale(p=0.2)
    "augment.blur_prob": 0.0,                   # no blur
    "augment.mean": [0.4914, 0.4822, 0.4465],   # Normalize(...)
    "augment.std": [0.2023, 0.1994, 0.2010],
    "model.arch": "resnet18",                   # torchvision resnet18, its own init
    "model.resnet_init": "torchvision",
    "model.small_image_stem": True,             # conv1 3x3 stride 1, max-pool removed
    "model.head": "linear",                     # resnet's fc: one Linear(512, 128)
    "model.dim": 128,                           # --moco-dim 128
    "moco.queue_size": 4096,                    # --moco-k
    "moco.momentum": 0.99,                      # --moco-m
    "moco.temperature": 0.1,                    # --moco-t
    "moco.symmetric": False,                    # args.symmetric = False
    "moco.key_chunks": 8,                       # --bn-splits 8 (key encoder)
    "train.micro_batch_size": 64,               # --bn-splits 8 of 512 (query encoder)
    "train.batch_size": 512,
    "train.epochs": 200,
    "train.optimizer": "sgd",                   # SGD, momentum 0.9
    "train.lr": 0.06,
    "train.weight_decay": 5e-4,
    "train.warmup_epochs": 0.0,
    "train.lr_schedule": "cosine_epoch_end",    # --cos, set per epoch, epochs counted from 1
    "eval.knn_k": 200,                          # --knn-k
    "eval.knn_t": 0.1,                          # --knn-t
    "eval.knn_every": 1,                        # test() after every epoch
    "eval.knn_features": "head",                # net = encoder_q: the 128-d fc output, normalised
    "eval.knn_max_train": 0,                    # memory bank: the whole training set
}
# The one difference the recipe states: mixed precision (the notebook runs fp32).
CIFAR10_NOTEBOOK_DIFFERENCES = {"train.precision": ("fp16", "no")}

# facebookresearch/moco, main_moco.py defaults and the README's MoCo v2 command:
# python main_moco.py -a resnet50 --lr 0.03 --batch-size 256 --mlp --moco-t 0.2 --aug-plus --cos
# on 8 GPUs (32 images each, per-GPU BatchNorm, key batch shuffled across them).
MOCO_V2_IMAGENET = {
    "data.image_size": 224,                     # RandomResizedCrop(224, scale=(0.2, 1.0))
    "augment.crop_scale": [0.2, 1.0],
    "augment.crop_ratio": [3 / 4, 4 / 3],
    "augment.jitter_prob": 0.8,                 # --aug-plus: ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8
    "augment.jitter": [0.4, 0.4, 0.4, 0.1],
    "augment.grayscale_prob": 0.2,
    "augment.blur_prob": 0.5,                   # GaussianBlur([0.1, 2.0]), p=0.5
    "augment.blur_sigma": [0.1, 2.0],
    "augment.blur_max_radius": 0,               # PIL's blur: never truncated
    "augment.flip_prob": 0.5,
    "augment.mean": [0.485, 0.456, 0.406],
    "augment.std": [0.229, 0.224, 0.225],
    "model.arch": "resnet50",                   # -a resnet50, torchvision's init
    "model.resnet_init": "torchvision",
    "model.small_image_stem": False,
    "model.head": "mlp",                        # --mlp
    "model.dim": 128,                           # --moco-dim
    "moco.queue_size": 65536,                   # --moco-k
    "moco.momentum": 0.999,                     # --moco-m
    "moco.temperature": 0.2,                    # --moco-t 0.2
    "moco.symmetric": False,
    "train.batch_size": 256,                    # --batch-size 256
    "train.micro_batch_size": 32,               # 8 GPUs x 32: per-GPU BatchNorm
    "moco.key_chunks": 8,                       # shuffle BN over 8 GPUs
    "train.epochs": 200,
    "train.optimizer": "sgd",
    "train.lr": 0.03,
    "train.weight_decay": 1e-4,
    "train.warmup_epochs": 0.0,
    "train.lr_schedule": "cosine_epoch_start",  # --cos, set per epoch, epochs counted from 0
}


def _check_table(cfg: Config, table: dict) -> None:
    wrong = {key: (get_key(cfg, key), want) for key, want in table.items() if get_key(cfg, key) != pytest.approx(want)}
    assert not wrong, f"recipe differs from its source (got, source): {wrong}"


def test_cifar10_recipe_is_the_official_notebook_field_by_field():
    cfg = load_config(RECIPES / "cifar10_resnet18.yaml")
    _check_table(cfg, CIFAR10_NOTEBOOK)
    for key, (ours, notebook) in CIFAR10_NOTEBOOK_DIFFERENCES.items():
        assert get_key(cfg, key) == ours
        assert get_key(load_config(RECIPES / "cifar10_resnet18.yaml", [f"{key}={notebook}"]), key) == notebook
    symmetric = load_config(RECIPES / "cifar10_resnet18.yaml", ["moco.symmetric=true"])  # the notebook's variant
    assert symmetric.moco.symmetric and symmetric.moco.queue_size >= 2 * symmetric.train.batch_size


def test_official_imagenet_recipe_is_main_moco_v2_field_by_field():
    _check_table(load_config(RECIPES / "imagenet_resnet50_mocov2.yaml"), MOCO_V2_IMAGENET)


def _flat(cfg: Config) -> dict:
    out = {}
    for section, values in dataclasses.asdict(cfg).items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            out[f"{section}.{key}" if key else section] = value
    return out


def test_cifar10_v2_recipe_changes_only_what_it_lists():
    notebook, v2 = _flat(load_config(RECIPES / "cifar10_resnet18.yaml")), _flat(load_config(RECIPES / "cifar10_resnet18_v2.yaml"))
    changed = {key for key in notebook if notebook[key] != v2[key]}
    assert changed == {"output_dir", "model.head", "augment.crop_scale", "augment.blur_prob", "eval.knn_features",
                       "eval.knn_every"}
    assert v2["model.head"] == "mlp" and v2["augment.crop_scale"] == [0.2, 1.0] and v2["augment.blur_prob"] == 0.5


def test_per_epoch_schedules_reproduce_the_official_learning_rates():
    notebook = load_config(RECIPES / "cifar10_resnet18.yaml").train
    steps = 50000 // 512  # 97 steps per epoch, as the notebook's log
    # The notebook's log prints lr 0.059967 in epoch 3 and 0.059631 in epoch 10, constant within an epoch.
    assert round(lr_at(2 * steps, steps, notebook), 6) == 0.059967
    assert round(lr_at(10 * steps - 1, steps, notebook), 6) == 0.059631
    assert lr_at(199 * steps + 5, steps, notebook) == pytest.approx(0.0, abs=1e-12)  # last epoch: cos(pi) = -1
    imagenet = load_config(RECIPES / "imagenet_resnet50_mocov2.yaml").train
    assert lr_at(5004, 5005, imagenet) == 0.03  # main_moco.py: epoch 0 at the full rate
    assert lr_at(100 * 5005, 5005, imagenet) == pytest.approx(0.015)
    assert lr_at(100 * 5005, 5005, dataclasses.replace(imagenet, lr_schedule="cosine")) == pytest.approx(0.015)
    assert lr_at(1, 5005, dataclasses.replace(imagenet, lr_schedule="cosine")) < 0.03  # per step: already decaying


# facebookresearch/moco-v3: main_moco.py's defaults and augmentation1/augmentation2, with CONFIG.md's
# commands. Shared by every v3 recipe:
MOCO_V3_COMMON = {
    "moco.version": "v3",
    "model.dim": 256,                           # --moco-dim
    "moco.momentum": 0.99,                      # --moco-m
    "moco.momentum_schedule": "cosine",         # --moco-m-cos
    "augment.jitter_prob": 0.8,                 # RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    "augment.jitter": [0.4, 0.4, 0.2, 0.1],
    "augment.grayscale_prob": 0.2,              # RandomGrayscale(p=0.2)
    "augment.blur_prob": [1.0, 0.1],            # GaussianBlur p=1.0 (view 1), p=0.1 (view 2)
    "augment.blur_sigma": [0.1, 2.0],
    "augment.solarize_prob": [0.0, 0.2],        # Solarize p=0.2 (view 2 only)
    "augment.flip_prob": 0.5,
    "train.lr_schedule": "cosine",              # adjust_learning_rate per iteration, after the warm-up
}
# CONFIG.md, "ViT-Small, 4-node (32-GPU) pre-training" (batch 4096 by default).
MOCO_V3_VIT_SMALL = {**MOCO_V3_COMMON,
    "model.arch": "vit_small_patch16_224", "data.image_size": 224,
    "model.head_hidden_dim": 4096,              # --moco-mlp-dim
    "model.freeze_patch_embed": True,           # --stop-grad-conv1
    "model.pos_embed": "sincos",                # vits.py build_2d_sincos_position_embedding
    "augment.crop_scale": [0.08, 1.0],          # --crop-min default .08
    "moco.temperature": 0.2,                    # --moco-t=.2
    "train.batch_size": 4096, "train.epochs": 300, "train.warmup_epochs": 40,
    "train.optimizer": "adamw", "train.lr": 1.5e-4 * 4096 / 256, "train.weight_decay": 0.1,
}
# CONFIG.md, "ResNet-50, 100-epoch pre-training": --moco-m-cos --crop-min=.2 on the defaults.
MOCO_V3_RESNET50 = {**MOCO_V3_COMMON,
    "model.arch": "resnet50", "data.image_size": 224,
    "model.resnet_init": "timm",                # torchvision's zero_init_residual=True
    "model.head_hidden_dim": 4096,
    "augment.crop_scale": [0.2, 1.0],           # --crop-min=.2
    "moco.temperature": 1.0,                    # --moco-t default
    "train.batch_size": 4096, "train.epochs": 100, "train.warmup_epochs": 10,
    "train.optimizer": "lars", "train.lr": 0.6 * 4096 / 256, "train.weight_decay": 1e-6,
}


@pytest.mark.parametrize("recipe, official", [("imagenet_vit_small_mocov3", MOCO_V3_VIT_SMALL),
                                              ("imagenet_resnet50_mocov3", MOCO_V3_RESNET50)])
def test_mocov3_recipes_are_the_official_settings(recipe, official):
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    differences = {k: (get_key(cfg, k), v) for k, v in official.items() if get_key(cfg, k) != pytest.approx(v)}
    assert differences == {}


def test_the_small_mocov3_recipe_keeps_the_vit_small_settings_it_does_not_scale():
    small = load_config(RECIPES / "imagenette_vit_tiny_mocov3.yaml")
    kept = {k: v for k, v in MOCO_V3_VIT_SMALL.items() if k not in
            ("model.arch", "data.image_size", "model.head_hidden_dim", "train.batch_size", "train.epochs",
             "train.warmup_epochs", "train.lr")}
    assert {k: get_key(small, k) for k in kept} == pytest.approx(kept)
    assert small.train.lr == pytest.approx(1.5e-4 * small.train.batch_size / 256)

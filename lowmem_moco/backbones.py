"""Backbones by timm name, with the switches that change memory but not the maths.

    backbone, width = create_backbone("resnet18", image_size=32, small_image_stem=True)
"""

from __future__ import annotations

import difflib

import timm
import torch
import torch.utils.checkpoint
from timm.models import checkpoint_seq
from timm.models.resnet import ResNet
from torch import nn

from .errors import ConfigError


def create_backbone(arch: str, image_size: int, small_image_stem: bool = False,
                    timm_kwargs: dict | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised timm model without classifier; returns (model, feature width).

    `timm_kwargs` go to timm.create_model as they are (model.timm_kwargs in a recipe).
    """
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; list names with timm.list_models('*pattern*')"
        raise ConfigError(f"model.arch {arch!r} is not a timm model{hint}")
    kwargs = dict(timm_kwargs or {}, num_classes=0)
    try:
        try:
            # Transformers take the input size as a constructor argument; convnets refuse it.
            model = timm.create_model(arch, **{"img_size": image_size, **kwargs})
        except TypeError:
            model = timm.create_model(arch, **kwargs)
    except Exception as err:
        if not timm_kwargs:
            raise
        raise ConfigError(f"timm could not build {arch} with model.timm_kwargs={timm_kwargs}: {err}; "
                          f"use arguments that {arch}'s timm constructor accepts") from None
    if small_image_stem:
        make_small_image_stem(model, arch)
    return model, output_width(model, image_size)


@torch.no_grad()
def output_width(model: nn.Module, image_size: int) -> int:
    """Width of the pooled features, measured: some families (MobileNetV3) add a conv head
    after what timm calls num_features."""
    was_training = model.training
    width = model.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    model.train(was_training)
    return width


def make_small_image_stem(model: nn.Module, arch: str = "") -> nn.Module:
    """ResNet-style stem for 32-px images: 3x3 stride-1 first conv and no max-pool.

    Also how to rebuild an exported small-stem backbone before loading its weights.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(f"model.small_image_stem works for ResNet-style models with a single conv1 and a "
                          f"max-pool (e.g. resnet18, resnet50); {arch or type(model).__name__} has none. "
                          f"Set model.small_image_stem=false")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def enable_grad_checkpointing(model: nn.Module, arch: str) -> None:
    """timm's activation checkpointing (plus a ResNet's stem); families without it get a clear message."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError) as err:
        raise ConfigError(f"{arch} does not support gradient checkpointing in timm ({err or 'not implemented'}); "
                          f"set train.grad_checkpointing=false or pick another model.arch") from None
    if isinstance(model, ResNet):
        # A class swap, not a patched attribute: a deep copy (the key encoder) then runs its own layers.
        model.__class__ = _STEM_CHECKPOINTED.setdefault(
            type(model), type(f"StemCheckpointed{type(model).__name__}", (_StemCheckpointed, type(model)), {}))


class _StemCheckpointed:
    """timm checkpoints a ResNet's stages but not its stem, whose full-resolution outputs
    (conv, BatchNorm, activation, max-pool indices) are about 40% of the activations left."""

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if not torch.is_grad_enabled():
            for module in [self._stem, *stages]:
                x = module(x)
            return x
        # Non-reentrant: the input images do not require grad.
        x = torch.utils.checkpoint.checkpoint(self._stem, x, use_reentrant=False)
        return checkpoint_seq(stages, x, flatten=True)


_STEM_CHECKPOINTED: dict[type, type] = {}


class MLPHead(nn.Sequential):
    """MoCo v2 projection head: Linear(d, h) - ReLU - Linear(h, dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """Backbone followed by the projection head; the output is not yet normalised."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_encoder(arch: str, image_size: int, small_image_stem: bool, dim: int,
                  head_hidden_dim: int | None = None, timm_kwargs: dict | None = None) -> Encoder:
    backbone, width = create_backbone(arch, image_size, small_image_stem, timm_kwargs)
    return Encoder(backbone, MLPHead(width, head_hidden_dim or width, dim))


def encoder_from_config(cfg) -> Encoder:
    """The query encoder a run's config (lowmem_moco.config.Config) describes."""
    m = cfg.model
    return build_encoder(m.arch, cfg.data.image_size, m.small_image_stem, m.dim, m.head_hidden_dim, m.timm_kwargs)

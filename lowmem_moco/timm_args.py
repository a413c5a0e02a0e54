"""The arguments a timm backbone is built with: which ones its constructor accepts, and the
plan that turns a run's model section into one `timm.create_model` call.

Recipes name settings that only some families have (a ResNet's `zero_init_last`, a narrower
ResNet's `channels`, a small-image stem). The plan applies each where the chosen architecture
accepts it and says, in one line per setting, where it does not; so any timm name works with
any recipe, and a setting no architecture knows (a typo) is an error.

    plan = plan_backbone("convnext_atto", 32, small_image_stem=True, timm_kwargs={"zero_init_last": False})
    plan.timm_kwargs  # {'patch_size': 1}; plan.notes says zero_init_last was not applied
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import sys
from dataclasses import dataclass

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConfigError

# Consumed by timm.create_model itself, so every architecture takes them. Others that look
# general (drop_path_rate, drop_block_rate, ...) reach the model class, which may refuse them.
CREATE_MODEL_ARGUMENTS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
    "scriptable", "exportable", "no_jit"})
# The project decides these itself.
RESERVED_ARGUMENTS = {"num_classes": "the projection head replaces the classifier",
                      "features_only": "the backbone must return pooled features"}
SMALL_IMAGE_PATCH = 4  # a ViT's patch at 32 px: an 8x8 token grid, as CIFAR ViTs use


@dataclass(frozen=True)
class BackbonePlan:
    arch: str
    timm_kwargs: dict  # exactly what timm.create_model gets besides num_classes=0
    rebuild_stem: bool  # a ResNet's small-image stem: apply backbones.make_small_image_stem after create_model
    notes: tuple[str, ...]  # one line per requested setting this architecture does not take
    # ViT changes after create_model (backbones.apply_vit_options), where the architecture takes them.
    freeze_patch_embed: bool = False
    pos_embed: str = "learned"

    def vit_options(self) -> dict:
        """The ViT options that differ from timm's model: {} for every other backbone, so the plans
        stored before these options existed read back equal."""
        return {k: v for k, v in (("freeze_patch_embed", self.freeze_patch_embed), ("pos_embed", self.pos_embed))
                if v != VIT_DEFAULTS[k]}

    def to_dict(self) -> dict:
        """What rebuilds this backbone, as JSON gives it back (lists, not tuples): stored in
        checkpoints and backbone.json, so a saved run is compared and rebuilt without re-planning."""
        return json.loads(json.dumps({"arch": self.arch, "timm_kwargs": self.timm_kwargs,
                                      "rebuild_small_image_stem": self.rebuild_stem, **self.vit_options()}))

    @classmethod
    def from_dict(cls, saved: dict) -> "BackbonePlan":
        options = {k: saved.get(k, default) for k, default in VIT_DEFAULTS.items()}
        return cls(saved["arch"], saved["timm_kwargs"], saved.get("rebuild_small_image_stem", False), (), **options)


VIT_DEFAULTS = {"freeze_patch_embed": False, "pos_embed": "learned"}  # timm's own ViT


# ------------------------------------------------------------------ what an architecture accepts


def check_arch(arch: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; list names with timm.list_models('*pattern*')"
        raise ConfigError(f"model.arch {arch!r} is not a timm model{hint}")


def _build_on_meta(arch: str, **kwargs) -> nn.Module:
    """The model without memory or initialisation cost: parameters on the meta device."""
    with torch.device("meta"):
        return timm.create_model(arch, num_classes=0, **kwargs)


@functools.lru_cache(maxsize=64)
def meta_model(arch: str) -> nn.Module | None:
    """The architecture's default instance on the meta device (its class and stem), or None
    for the rare model that cannot be built there."""
    try:
        return _build_on_meta(arch)
    except Exception:
        return None


def named_init_arguments(cls: type) -> tuple[set[str], bool]:
    """(argument names of cls.__init__, whether some **kwargs stay unresolved).

    A class whose __init__ takes **kwargs is followed up its bases while it does, since such
    kwargs usually go to super().__init__; reaching nn.Module leaves them unresolved (RegNet,
    for example, lays its **kwargs over a config dataclass).
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            return names, True
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def accepts(arch: str, name: str, value) -> bool:
    """Whether timm.create_model(arch, name=value) gets past argument binding.

    The class signature says which names the constructor takes; a build on the meta device
    then confirms the name for this entry point (some fix an argument themselves, e.g.
    EfficientNet's num_features) and resolves classes that take **kwargs.
    """
    if name in CREATE_MODEL_ARGUMENTS:
        return True
    model = meta_model(arch)
    if model is None:
        return True  # unknown: timm's own error then names the argument
    names, open_ended = named_init_arguments(type(model))
    if name not in names and not open_ended:
        return False
    try:
        _build_on_meta(arch, **{name: value})
    except TypeError as err:
        return f"'{name}'" not in str(err)
    except Exception:
        pass  # a bad value, not a bad name: the real build reports it
    return True


@functools.lru_cache(maxsize=1)
def known_arguments() -> frozenset[str]:
    """Every argument some timm architecture accepts: its model classes' constructor arguments
    and the fields of the config dataclasses some families take (RegNet, ByobNet, ...)."""
    names = set(CREATE_MODEL_ARGUMENTS)
    for module_name, module in list(sys.modules.items()):
        # Private modules (timm.models._*) hold timm's own machinery, such as PretrainedCfg.
        if not module_name.startswith("timm.models.") or module_name.startswith("timm.models._") or module is None:
            continue
        for obj in vars(module).values():
            if not isinstance(obj, type) or obj.__module__ != module_name:
                continue
            if issubclass(obj, nn.Module) and hasattr(obj, "forward_features") and hasattr(obj, "forward_head"):
                names |= named_init_arguments(obj)[0]
            elif dataclasses.is_dataclass(obj) and obj.__name__.endswith("Cfg"):
                names |= {f.name for f in dataclasses.fields(obj)}
    return frozenset(names)


# ------------------------------------------------------------------ the plan


def _small_image_stem(arch: str, model: nn.Module | None, image_size: int) -> tuple[dict, bool, str | None]:
    """(timm kwargs, whether the ResNet stem is rebuilt, note when not applied) for a
    small-image stem: the stem no longer divides the resolution by 4 (ViT: patch 4)."""
    if isinstance(model, ResNet):  # plain and deep stems alike
        return {}, True, None
    if isinstance(model, ConvNeXt):
        first = model.stem[0]
        if first.kernel_size == first.stride:  # the patchify stem; patch 1 keeps the full resolution
            return {"patch_size": 1}, False, None
    if isinstance(model, VisionTransformer) and isinstance(model.patch_embed, PatchEmbed):  # not a hybrid's CNN
        own = model.patch_embed.patch_size[0]
        patch = min(own, SMALL_IMAGE_PATCH)
        if image_size % patch:
            raise ConfigError(f"model.small_image_stem gives {arch} patches of {patch} px, which do not tile "
                              f"data.image_size={image_size}; use an image size divisible by {patch}")
        return {"patch_size": patch}, False, None
    return {}, False, (f"model.small_image_stem is not applied to {arch}: the project adapts ResNet stems, "
                       f"ConvNeXt patchify stems and ViT patch embeddings only")


def _vit_options(arch: str, model: nn.Module | None, kwargs: dict, freeze_patch_embed: bool, pos_embed: str
                 ) -> tuple[dict, list[str]]:
    """(the ViT options `arch` takes, a note per option it does not): MoCo v3's frozen patch
    projection and fixed sin-cos position embedding exist for ViTs with a patch embedding."""
    is_vit = isinstance(model, VisionTransformer) and isinstance(model.patch_embed, PatchEmbed)
    applied, notes = {}, []
    for key, value in (("freeze_patch_embed", freeze_patch_embed), ("pos_embed", pos_embed)):
        if value == VIT_DEFAULTS[key]:
            continue
        if is_vit and (key != "pos_embed" or model.pos_embed is not None):
            applied[key] = value
        else:
            notes.append(f"model.{key}={value} is not applied to {arch}: it applies to timm ViTs with a patch "
                         f"embedding{' and a position embedding' if key == 'pos_embed' else ''} only")
    width = kwargs.get("embed_dim", getattr(model, "embed_dim", 0))
    if applied.get("pos_embed") == "sincos" and width % 4:
        raise ConfigError(f"model.pos_embed=sincos needs an embedding width divisible by 4 (sin and cos of two "
                          f"axes); {arch} has {width}; use model.pos_embed=learned")
    return applied, notes


def plan_backbone(arch: str, image_size: int, small_image_stem: bool = False, timm_kwargs: dict | None = None,
                  resnet_init: str = "timm", freeze_patch_embed: bool = False,
                  pos_embed: str = "learned") -> BackbonePlan:
    """The timm.create_model arguments for a run's model section, filtered by what `arch` accepts."""
    check_arch(arch)
    requested = dict(timm_kwargs or {})
    for name, why in RESERVED_ARGUMENTS.items():
        if name in requested:
            raise ConfigError(f"model.timm_kwargs.{name} cannot be set: {why}; remove it")
    unknown = sorted(set(requested) - known_arguments())
    if unknown:
        close = difflib.get_close_matches(unknown[0], known_arguments(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.timm_kwargs.{unknown[0]} is not an argument of any timm architecture{hint}; "
                          f"fix or remove it")
    model, notes, kwargs = meta_model(arch), [], {}
    for name, value in requested.items():
        if accepts(arch, name, value):
            kwargs[name] = value
        else:
            notes.append(f"model.timm_kwargs.{name} is not an argument of {arch}; not applied")

    if resnet_init == "torchvision":
        if isinstance(model, ResNet):
            if kwargs.get("zero_init_last", False):
                raise ConfigError("model.resnet_init=torchvision contradicts model.timm_kwargs.zero_init_last=true; "
                                  "remove one of them")
            kwargs["zero_init_last"] = False  # torchvision's init keeps each block's last BatchNorm at 1
        else:
            notes.append(f"model.resnet_init=torchvision is not applied to {arch}: it sets the init of ResNets only")

    if accepts(arch, "img_size", image_size) and "img_size" not in requested:
        kwargs["img_size"] = image_size  # transformers size their position embedding from it
    rebuild_stem = False
    if small_image_stem:
        stem_kwargs, rebuild_stem, note = _small_image_stem(arch, model, image_size)
        kwargs.update({k: v for k, v in stem_kwargs.items() if k not in requested})  # an explicit kwarg wins
        notes += [note] if note else []
    vit, vit_notes = _vit_options(arch, model, kwargs, freeze_patch_embed, pos_embed)
    return BackbonePlan(arch, kwargs, rebuild_stem, tuple(notes + vit_notes), **vit)

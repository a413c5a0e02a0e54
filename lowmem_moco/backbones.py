"""Backbones by timm name, the projection head, and the switches that change memory but not the maths.

    backbone, width = create_backbone("resnet18", image_size=32, small_image_stem=True)

Any timm name works with any recipe: timm_args.plan_backbone applies each model setting where
the architecture takes it and logs one line for each it does not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import timm
import torch
import torch.utils.checkpoint
from timm.models import checkpoint_seq
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConfigError
from .timm_args import BackbonePlan, plan_backbone

log = logging.getLogger(__name__)


def create_backbone(arch: str, image_size: int, small_image_stem: bool = False,
                    timm_kwargs: dict | None = None, resnet_init: str = "timm") -> tuple[nn.Module, int]:
    """A randomly initialised timm model without classifier; returns (model, feature width).

    `timm_kwargs` (model.timm_kwargs) reach timm.create_model where `arch` accepts them.
    """
    plan = plan_backbone(arch, image_size, small_image_stem, timm_kwargs, resnet_init)
    return backbone_from_plan(plan, image_size)


def backbone_from_plan(plan: BackbonePlan, image_size: int) -> tuple[nn.Module, int]:
    """(the backbone `plan` describes, its feature width), after logging the plan's notes."""
    for note in plan.notes:
        log.warning(note)
    model = build_planned(plan)
    return model, feature_width(model, image_size)


def build_planned(plan: BackbonePlan) -> nn.Module:
    """The backbone a plan describes; also how an exported backbone is rebuilt (backbone.json)."""
    try:
        model = timm.create_model(plan.arch, num_classes=0, **plan.timm_kwargs)
    except Exception as err:
        if not plan.timm_kwargs:
            raise
        raise ConfigError(f"timm could not build {plan.arch} with {plan.timm_kwargs}: {err}; "
                          f"check the values in model.timm_kwargs") from None
    model = make_small_image_stem(model, plan.arch) if plan.rebuild_stem else model
    return apply_vit_options(model, plan)


def apply_vit_options(model: nn.Module, plan: BackbonePlan) -> nn.Module:
    """MoCo v3's ViT changes (vits.py), in place, where the plan holds them (timm_args._vit_options).

    freeze_patch_embed (--stop-grad-conv1): the patch projection keeps its random init; the
    optimizer leaves it out. pos_embed=sincos: the fixed table of sincos_position_embedding,
    not trained. Neither changes a tensor's shape: the state dict, checkpoints and exports
    hold the same keys, and the plan stored with them rebuilds the flags.
    """
    if plan.freeze_patch_embed:
        model.patch_embed.proj.requires_grad_(False)
    if plan.pos_embed == "sincos":
        grid_h, grid_w = model.patch_embed.grid_size
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens  # tokens that carry a position
        table = sincos_position_embedding(grid_h, grid_w, model.embed_dim, prefix)
        with torch.no_grad():
            model.pos_embed.copy_(table.reshape(model.pos_embed.shape))
        model.pos_embed.requires_grad_(False)
    return model


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, prefix: int = 1,
                              temperature: float = 10000.0) -> torch.Tensor:
    """(1, prefix + h * w, dim) MoCo v3's build_2d_sincos_position_embedding (vits.py): zeros for
    the class (prefix) tokens, then [sin, cos] of the first coordinate and [sin, cos] of the
    second, at frequencies temperature ** -(k / (dim / 4)).

    The official table is laid out as meshgrid(w, h) ("ij") flattened, so on timm's row-major
    tokens the first half encodes the row on square grids (the paper's); kept as it is, so
    weights move between this table and the official one unchanged.
    """
    if dim % 4:
        raise ConfigError(f"model.pos_embed=sincos needs an embedding width divisible by 4; got {dim}")
    first, second = torch.meshgrid(torch.arange(grid_w, dtype=torch.float32),
                                   torch.arange(grid_h, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_first, out_second = torch.outer(first.flatten(), omega), torch.outer(second.flatten(), omega)
    table = torch.cat([out_first.sin(), out_first.cos(), out_second.sin(), out_second.cos()], dim=1)
    return torch.cat([torch.zeros(prefix, dim), table])[None]


def feature_width(model: nn.Module, image_size: int) -> int:
    """Width of the pooled features: timm's head_hidden_size (the width after a conv head such
    as MobileNetV3's, which num_features does not count), else num_features, else measured."""
    for name in ("head_hidden_size", "num_features"):
        width = getattr(model, name, None)
        if isinstance(width, int) and width > 0:
            return width
    return output_width(model, image_size)


@torch.no_grad()
def output_width(model: nn.Module, image_size: int) -> int:
    """Width of the pooled features, measured on one blank image."""
    was_training = model.training
    width = model.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    model.train(was_training)
    return width


def make_small_image_stem(model: nn.Module, arch: str = "") -> nn.Module:
    """A ResNet's stem for 32-px images: stride 1 and no max-pool, so the stem keeps the resolution.

    A plain stem's 7x7 stride-2 conv becomes a 3x3 stride-1 conv (the CIFAR ResNet's); a deep
    stem (resnet*d, resnet10t) keeps its three 3x3 convs with the first one's stride set to 1.
    Also how to rebuild an exported small-stem ResNet before loading its weights.
    """
    conv = getattr(model, "conv1", None)
    first = conv[0] if isinstance(conv, nn.Sequential) and len(conv) else conv
    if not isinstance(model, ResNet) or not isinstance(first, nn.Conv2d):
        raise ConfigError(f"make_small_image_stem adapts timm ResNets (plain or deep stem); "
                          f"{arch or type(model).__name__} is not one. Set model.small_image_stem=false")
    if isinstance(conv, nn.Sequential):
        first.stride = (1, 1)
    else:
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def load_exported_backbone(path: str | Path) -> nn.Module:
    """An exported backbone (backbone.safetensors next to its backbone.json), rebuilt and loaded:
    the one way an export is read back (`lowmem-moco eval` on a run without checkpoints too)."""
    path = Path(path)
    model = build_planned(BackbonePlan.from_dict(json.loads(path.with_suffix(".json").read_text())))
    model.load_state_dict(timm.models.load_state_dict(str(path)))
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


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Module:
    """model.head: mlp (MoCo v2) or linear (MoCo v1 and the official CIFAR-10 notebook: one Linear(d, dim))."""
    if kind == "mlp":
        return MLPHead(in_dim, hidden_dim or in_dim, out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ConfigError(f"model.head must be one of mlp, linear; got {kind!r}")


V3_HIDDEN_DIM = 4096  # MoCo v3's mlp_dim: model.head_hidden_dim when unset under moco.version=v3


def v3_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP (builder.py `_build_mlp`): Linear without bias, then BatchNorm1d and ReLU
    between layers; last_bn adds a BatchNorm1d without affine after the last Linear (projector: yes,
    predictor: no)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        width = out_dim if last else hidden_dim
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, width, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(width, affine=False))
    return nn.Sequential(*layers)


def v3_projector(backbone: nn.Module, width: int, dim: int, hidden_dim: int | None) -> nn.Sequential:
    """MoCo v3's projector: 3 layers after a ViT (timm's VisionTransformer and its subclasses),
    2 after anything else (the official ResNet's)."""
    layers = 3 if isinstance(backbone, VisionTransformer) else 2
    return v3_mlp(layers, width, hidden_dim or V3_HIDDEN_DIM, dim, last_bn=True)


def predictor_from_config(cfg) -> nn.Module | None:
    """MoCo v3's predictor on the query side (2 layers, no last BatchNorm); None under v2."""
    m = cfg.model
    return v3_mlp(2, m.dim, m.head_hidden_dim or V3_HIDDEN_DIM, m.dim, last_bn=False) if cfg.moco.version == "v3" else None


class Encoder(nn.Module):
    """Backbone followed by the projection head; the output is not yet normalised. `plan` is how
    the backbone was built: checkpoints and exports store it, resumes compare against it."""

    def __init__(self, backbone: nn.Module, head: nn.Module, plan: BackbonePlan | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.plan = plan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_encoder(arch: str, image_size: int, small_image_stem: bool, dim: int,
                  head_hidden_dim: int | None = None, timm_kwargs: dict | None = None,
                  head: str = "mlp", resnet_init: str = "timm") -> Encoder:
    plan = plan_backbone(arch, image_size, small_image_stem, timm_kwargs, resnet_init)
    return encoder_from_plan(plan, image_size, dim, head, head_hidden_dim)


def encoder_from_plan(plan: BackbonePlan, image_size: int, dim: int, head: str = "mlp",
                      head_hidden_dim: int | None = None) -> Encoder:
    backbone, width = backbone_from_plan(plan, image_size)
    return Encoder(backbone, build_head(head, width, dim, head_hidden_dim), plan)


def backbone_plan_from_config(cfg) -> BackbonePlan:
    """How a run's config (lowmem_moco.config.Config) builds its backbone; raises ConfigError
    for an unknown arch or a timm kwarg that no architecture takes. A run works it out once
    (before any data work) and hands it on: the Encoder holds it, checkpoints store it."""
    m = cfg.model
    return plan_backbone(m.arch, cfg.data.image_size, m.small_image_stem, m.timm_kwargs, m.resnet_init,
                         m.freeze_patch_embed, m.pos_embed)


def encoder_from_config(cfg, plan: BackbonePlan | None = None) -> Encoder:
    """The query encoder a run's config describes (under moco.version=v3 its head is MoCo v3's
    projector); `plan`: the backbone's, when already worked out (the run's own, or the one a
    checkpoint stored)."""
    m = cfg.model
    plan = plan or backbone_plan_from_config(cfg)
    if cfg.moco.version == "v2":
        return encoder_from_plan(plan, cfg.data.image_size, m.dim, m.head, m.head_hidden_dim)
    backbone, width = backbone_from_plan(plan, cfg.data.image_size)
    return Encoder(backbone, v3_projector(backbone, width, m.dim, m.head_hidden_dim), plan)

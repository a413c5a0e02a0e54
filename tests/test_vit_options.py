"""model.freeze_patch_embed and model.pos_embed: MoCo v3's ViT options (vits.py), ViTs only,
kept through checkpoints and exports."""

import json
import logging

import pytest
import torch

from lowmem_moco.backbones import (backbone_plan_from_config, encoder_from_config, load_exported_backbone,
                                   sincos_position_embedding)
from lowmem_moco.checkpoint import check_compatible, export_backbone
from lowmem_moco.config import load_config
from lowmem_moco.errors import CheckpointError, ConfigError
from lowmem_moco.optim import build_optimizer
from support import missing

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
VIT = ["model.arch=vit_tiny_patch16_224", "model.timm_kwargs.depth=1", "data.image_size=32",
       "model.small_image_stem=true"]  # patch 4: an 8x8 grid, width 192
V3 = ["model.freeze_patch_embed=true", "model.pos_embed=sincos"]


def official_table(h, w, embed_dim, temperature=10000.):
    """facebookresearch/moco-v3 vits.py build_2d_sincos_position_embedding, restated."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")  # torch's default then
    pos_dim = embed_dim // 4
    omega = 1. / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum('m,d->md', [grid_w.flatten(), omega])
    out_h = torch.einsum('m,d->md', [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    return torch.cat([torch.zeros([1, 1, embed_dim]), pos_emb], dim=1)


def vit(*changes):
    cfg = load_config(None, [*VIT, *changes])
    return cfg, encoder_from_config(cfg)


@pytest.mark.parametrize("grid", [(8, 8), (2, 3)])
def test_sincos_table_is_moco_v3s(grid):
    assert torch.equal(sincos_position_embedding(*grid, 192), official_table(*grid, 192))


def test_sincos_and_frozen_patch_embed_on_a_vit_do_not_train():
    """The fixed table (class token's row zeros) and the patch projection have no gradient, the
    optimizer leaves them out, and a step with weight decay moves everything else."""
    cfg, encoder = vit(*V3, "train.optimizer=adamw", "train.weight_decay=0.1")
    backbone = encoder.backbone
    assert torch.equal(backbone.pos_embed.detach(), official_table(8, 8, 192))
    frozen = {backbone.pos_embed, backbone.patch_embed.proj.weight, backbone.patch_embed.proj.bias}
    assert {p for p in encoder.parameters() if not p.requires_grad} == frozen
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    optimizer = build_optimizer(encoder.parameters(), cfg)
    assert not frozen & {p for group in optimizer.param_groups for p in group["params"]}
    encoder(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    for name, p in encoder.named_parameters():
        assert torch.equal(p, before[name]) == (p in frozen), name


def test_defaults_leave_timms_vit_as_it_was():
    torch.manual_seed(0)
    plain = vit()[1]
    assert all(p.requires_grad for p in plain.parameters())
    assert set(backbone_plan_from_config(load_config(None, VIT)).to_dict()) == {
        "arch", "timm_kwargs", "rebuild_small_image_stem"}  # plans stored before these options read back equal


def test_other_families_get_one_line_per_option_and_no_change(caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    plain = encoder_from_config(load_config(None, ["model.arch=resnet18"])).state_dict()
    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=resnet18", *V3])
    asked = encoder_from_config(cfg)
    assert all(torch.equal(plain[k], v) for k, v in asked.state_dict().items())
    assert all(p.requires_grad for p in asked.parameters())
    lines = [r.getMessage() for r in caplog.records if r.name == "lowmem_moco.backbones"]
    assert len(lines) == 2
    for line, key in zip(lines, ["model.freeze_patch_embed", "model.pos_embed"]):
        assert missing(line, key, "not applied", "resnet18", "ViT") == []
    assert backbone_plan_from_config(cfg).vit_options() == {}


def test_sincos_needs_a_width_divisible_by_4():
    with pytest.raises(ConfigError, match="model.pos_embed=sincos.*66.*model.pos_embed=learned"):
        vit("model.pos_embed=sincos", "model.timm_kwargs.embed_dim=66")


def test_export_reloads_the_options_and_the_weights(tmp_path):
    cfg, encoder = vit(*V3)
    backbone = encoder.backbone.eval()
    path = export_backbone(backbone, encoder.plan, tmp_path / "backbone.safetensors", cfg, step=1)
    info = json.loads(path.with_suffix(".json").read_text())
    assert (info["freeze_patch_embed"], info["pos_embed"]) == (True, "sincos")
    reloaded = load_exported_backbone(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), backbone(x))
    assert [n for n, p in reloaded.named_parameters() if not p.requires_grad] == [
        n for n, p in backbone.named_parameters() if not p.requires_grad]


@pytest.mark.parametrize("saved_options,changes", [(V3, []), (V3, V3[:1]), ([], V3[1:])])
def test_resume_refuses_other_vit_options(tmp_path, saved_options, changes):
    saved = load_config(None, [*VIT, *saved_options])
    meta = {"config": saved.to_dict(), "backbone": backbone_plan_from_config(saved).to_dict()}
    check_compatible(meta, saved, backbone_plan_from_config(saved), tmp_path)  # the same options resume
    cfg = load_config(None, [*VIT, *changes])
    with pytest.raises(CheckpointError, match="pos_embed|freeze_patch_embed"):
        check_compatible(meta, cfg, backbone_plan_from_config(cfg), tmp_path)

"""timm backbones by name: settings applied per family, small-image stems, heads, export, checkpointing."""

import copy
import json
import logging

import pytest
import timm
import torch
from torch import nn

from lowmem_moco.backbones import (backbone_plan_from_config, build_encoder, build_head, create_backbone,
                                   enable_grad_checkpointing, encoder_from_config, load_exported_backbone,
                                   make_small_image_stem, output_width)
from lowmem_moco.checkpoint import export_backbone
from lowmem_moco.config import load_config, save_config
from lowmem_moco.errors import CheckpointError, ConfigError
from lowmem_moco.eval.run import load_run
from lowmem_moco.checkpoint import check_compatible
from support import missing, raises_naming

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
FAMILIES = ["resnet18", "resnet50", "convnext_atto", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050",
            "vit_tiny_patch16_224"]


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lowmem_moco.backbones"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_common_families_build_train_and_checkpoint_with_the_measured_head_width(arch):
    enc = build_encoder(arch, image_size=32, small_image_stem=False, dim=8)
    # timm's declared width is what the pooled features measure (MobileNetV3: after its conv head)
    assert enc.head[0].in_features == enc.head[0].out_features == output_width(enc.backbone, 32)
    enable_grad_checkpointing(enc.backbone, arch)
    out = enc(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 8)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050"])
def test_heads_mlp_is_moco_v2s_and_linear_is_one_layer(arch):
    width = output_width(create_backbone(arch, 32)[0], 32)
    mlp = build_encoder(arch, 32, False, dim=16, head="mlp", head_hidden_dim=64).head
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (width, 64, 16)
    linear = build_encoder(arch, 32, False, dim=16, head="linear").head
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (width, 16)


def test_unknown_head_is_one_line_naming_the_key():
    with raises_naming(ConfigError, "model.head", "mlp, linear", "'conv'"):
        load_config(None, ["model.head=conv"])
    with pytest.raises(ConfigError, match="model.head"):
        build_head("conv", 8, 4)


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(ConfigError, match=r"'resnet_18' is not a timm model; close names: .*resnet18"):
        create_backbone("resnet_18", 32)


def test_timm_kwargs_reach_the_model_and_a_typo_is_an_error_naming_it():
    narrow, width = create_backbone("resnet18", 32, timm_kwargs={"channels": [16, 32, 64, 128],
                                                                "zero_init_last": False})
    assert width == 128 and narrow.layer1[0].conv1.out_channels == 16
    assert torch.all(narrow.layer1[0].bn2.weight == 1)  # BatchNorm's own init; timm zeroes it by default
    with raises_naming(ConfigError, "model.timm_kwargs.zero_init_lst", "not an argument", "zero_init_last"):
        create_backbone("convnext_atto", 32, timm_kwargs={"zero_init_lst": False})
    with raises_naming(ConfigError, "model.timm_kwargs.num_classes"):
        create_backbone("resnet18", 32, timm_kwargs={"num_classes": 10})


def test_a_kwarg_the_architecture_does_not_take_is_dropped_with_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    model, _ = create_backbone("convnext_atto", 32, timm_kwargs={"zero_init_last": False, "channels": [8, 8, 8, 8],
                                                                 "drop_path_rate": 0.1})
    dropped = notes(caplog)
    assert len(dropped) == 2
    assert missing(dropped[0], "model.timm_kwargs.zero_init_last", "convnext_atto", "not applied") == []
    assert missing(dropped[1], "model.timm_kwargs.channels", "convnext_atto", "not applied") == []
    # the accepted one was applied: timm's stochastic depth rises to drop_path_rate at the last block
    assert model.stages[3].blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    caplog.clear()
    # RegNet takes **kwargs onto its config: settled by what its constructor binds, not its signature
    create_backbone("regnetx_002", 32, timm_kwargs={"se_ratio": 0.25, "channels": [8, 8, 8, 8]})
    dropped = notes(caplog)
    assert len(dropped) == 1 and missing(dropped[0], "model.timm_kwargs.channels", "regnetx_002", "not applied") == []


def _last_bn_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([block.bn2.weight for stage in (model.layer1, model.layer2) for block in stage])


def test_resnet_init_torchvision_changes_resnets_only(caplog):
    caplog.set_level(logging.INFO)
    timm_init, _ = create_backbone("resnet18", 32)
    tv_init, _ = create_backbone("resnet18", 32, resnet_init="torchvision")
    assert torch.all(_last_bn_weights(timm_init) == 0) and torch.all(_last_bn_weights(tv_init) == 1)
    assert notes(caplog) == []
    for arch in ("regnetx_002", "convnext_atto"):  # RegNet takes zero_init_last too, but is not a ResNet
        torch.manual_seed(0)
        default = create_backbone(arch, 32)[0].state_dict()
        torch.manual_seed(0)
        asked = create_backbone(arch, 32, resnet_init="torchvision")[0].state_dict()
        assert all(torch.equal(default[k], asked[k]) for k in default)
        assert missing(notes(caplog)[-1], "model.resnet_init=torchvision", "not applied", arch, "ResNets") == []
    with raises_naming(ConfigError, "model.resnet_init=torchvision", "model.timm_kwargs.zero_init_last=true"):
        create_backbone("resnet18", 32, timm_kwargs={"zero_init_last": True}, resnet_init="torchvision")


@pytest.mark.parametrize("arch,plain,small", [
    ("resnet18", 1, 4), ("resnet10t", 1, 4),  # plain and deep stems: 32 px / 32 -> 32 px / 8
    ("convnext_atto", 1, 4),  # patchify stem 4 -> 1
])
def test_small_image_stem_keeps_resolution_for_32px_convnets(arch, plain, small):
    x = torch.randn(2, 3, 32, 32)
    assert create_backbone(arch, 32)[0].forward_features(x).shape[-1] == plain
    model, width = create_backbone(arch, 32, small_image_stem=True)
    assert model.forward_features(x).shape[-1] == small
    assert model(x).shape == (2, width)


def test_small_image_stem_gives_a_vit_patch_4_at_32px():
    x = torch.randn(2, 3, 32, 32)
    plain, _ = create_backbone("vit_tiny_patch16_224", 32)
    small, width = create_backbone("vit_tiny_patch16_224", 32, small_image_stem=True)
    assert plain.forward_features(x).shape[1] == 1 + 2 * 2  # class token + 2x2 patches of 16 px
    assert small.forward_features(x).shape[1] == 1 + 8 * 8  # class token + 8x8 patches of 4 px
    assert small(x).shape == (2, width)
    with pytest.raises(ConfigError, match="data.image_size=30"):
        create_backbone("vit_tiny_patch16_224", 30, small_image_stem=True)


def test_small_image_stem_elsewhere_is_one_log_line_and_no_change(caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    plain = create_backbone("mobilenetv3_small_050", 32)[0].state_dict()
    torch.manual_seed(0)
    asked = create_backbone("mobilenetv3_small_050", 32, small_image_stem=True)[0].state_dict()
    assert all(torch.equal(plain[k], asked[k]) for k in plain)
    note, = notes(caplog)
    assert missing(note, "model.small_image_stem", "not applied", "mobilenetv3_small_050") == []
    with pytest.raises(ConfigError):
        make_small_image_stem(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch,kwargs", [
    ("resnet10t", ["model.timm_kwargs.channels=[8,16,16,16]"]), ("convnext_atto", []),
    ("vit_tiny_patch16_224", ["model.timm_kwargs.depth=2"]),
])
def test_exported_small_stem_backbones_reload_bit_identical(tmp_path, arch, kwargs):
    cfg = load_config(None, [f"model.arch={arch}", "model.small_image_stem=true", "data.image_size=32",
                             "model.resnet_init=torchvision", f"output_dir={tmp_path}", *kwargs])
    encoder = encoder_from_config(cfg)
    backbone = encoder.backbone.eval()
    with torch.no_grad():  # a trained look: BatchNorm statistics and weights away from their init
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)
    path = export_backbone(backbone, encoder.plan, tmp_path / "backbone.safetensors", cfg, step=3)
    save_config(cfg, tmp_path / "config.yaml")
    x = torch.randn(2, 3, 32, 32)
    reloaded = [load_exported_backbone(path), load_run(tmp_path)[1]]
    if arch != "resnet10t":  # no project code needed: the adapted stem is a timm argument
        info = json.loads(path.with_suffix(".json").read_text())
        assert not info["rebuild_small_image_stem"]
        reloaded.append(timm.create_model(arch, pretrained=True, num_classes=0, **info["timm_kwargs"],
                                          pretrained_cfg_overlay=dict(file=str(path))))
    with torch.no_grad():
        expected = backbone(x)
        for model in reloaded:
            assert torch.equal(model.eval()(x), expected)


def test_resume_refuses_another_head_or_backbone_size_but_not_an_init_that_changes_nothing(tmp_path):
    base = ["model.arch=vit_tiny_patch16_224", "model.timm_kwargs.depth=1", "data.image_size=32"]
    saved = load_config(None, base)
    meta = {"config": saved.to_dict(), "backbone": backbone_plan_from_config(saved).to_dict()}

    def check(*changes):
        cfg = load_config(None, [*base, *changes])
        check_compatible(meta, cfg, backbone_plan_from_config(cfg), tmp_path)

    check()
    for change, key in [("model.head=linear", "model.head"), ("data.image_size=64", "img_size")]:
        with pytest.raises(CheckpointError, match=key):
            check(change)
    # A ViT has no ResNet init to change: the same backbone is built, so the run resumes.
    check("model.resnet_init=torchvision")


def test_family_without_checkpointing_gets_a_clear_message():
    class NoCheckpointing(torch.nn.Module):
        def set_grad_checkpointing(self, enable=True):
            assert not enable, "gradient checkpointing not supported"

    with pytest.raises(ConfigError, match="train.grad_checkpointing=false"):
        enable_grad_checkpointing(NoCheckpointing(), "somenet")


def test_checkpointed_resnet_keeps_its_names_gradients_and_a_deep_copy_runs_its_own_weights():
    """Checkpointing recomputes the forward in the backward pass: the gradients must be the plain model's."""
    enc = build_encoder("resnet10t", image_size=32, small_image_stem=True, dim=8)
    plain = copy.deepcopy(enc)
    names = list(enc.state_dict())
    enable_grad_checkpointing(enc.backbone, "resnet10t")
    assert list(enc.state_dict()) == names  # the exported weights keep timm's names
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        twin.backbone.conv1[0].weight.mul_(-1.0)
        x = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(enc(x), twin(x))
    enc(x).sum().backward()  # checkpointed (small-image) stem and stages under autograd
    plain(x).sum().backward()
    for (name, p), p_plain in zip(enc.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p_plain.grad, msg=name)

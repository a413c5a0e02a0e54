"""timm backbones by name, the small-image stem, checkpointing switches."""

import pytest
import torch

from lowmem_moco.backbones import build_encoder, create_backbone, enable_grad_checkpointing, make_small_image_stem
from lowmem_moco.errors import ConfigError


@pytest.mark.parametrize("arch,size", [
    ("resnet18", 32), ("resnet50", 32), ("convnext_atto", 32), ("efficientnet_b0", 32),
    ("regnetx_002", 32), ("mobilenetv3_small_050", 32), ("vit_tiny_patch16_224", 32),
])
def test_common_families_build_train_and_checkpoint(arch, size):
    enc = build_encoder(arch, image_size=size, small_image_stem=False, dim=8)
    enable_grad_checkpointing(enc.backbone, arch)
    out = enc(torch.randn(2, 3, size, size))
    out.sum().backward()
    assert out.shape == (2, 8)
    assert enc.head[0].in_features == enc.head[0].out_features


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(ConfigError, match=r"'resnet_18' is not a timm model; close names: .*resnet18"):
        create_backbone("resnet_18", 32)


def test_timm_kwargs_reach_the_model_and_bad_ones_get_a_clear_message():
    narrow, width = create_backbone("resnet18", 32, timm_kwargs={"channels": [16, 32, 64, 128],
                                                                "zero_init_last": False})
    assert width == 128 and narrow.layer1[0].conv1.out_channels == 16
    assert narrow.layer1[0].bn2.weight.abs().sum() > 0  # timm zeroes it by default
    with pytest.raises(ConfigError, match=r"model.timm_kwargs=\{'no_such_argument': 1\}.*no_such_argument"):
        create_backbone("resnet18", 32, timm_kwargs={"no_such_argument": 1})


def test_small_image_stem_keeps_resolution_for_32px_images():
    plain, _ = create_backbone("resnet18", 32)
    small, _ = create_backbone("resnet18", 32, small_image_stem=True)
    x = torch.randn(2, 3, 32, 32)
    assert plain.forward_features(x).shape[-1] == 1  # 32 px / 32
    assert small.forward_features(x).shape[-1] == 4  # 32 px / 8: no stride-2 stem, no max-pool
    assert small.conv1.kernel_size == (3, 3)


def test_small_image_stem_refuses_models_without_a_resnet_stem():
    with pytest.raises(ConfigError, match="model.small_image_stem=false"):
        create_backbone("vit_tiny_patch16_224", 32, small_image_stem=True)
    with pytest.raises(ConfigError):
        make_small_image_stem(torch.nn.Linear(2, 2))


def test_family_without_checkpointing_gets_a_clear_message():
    class NoCheckpointing(torch.nn.Module):
        def set_grad_checkpointing(self, enable=True):
            assert not enable, "gradient checkpointing not supported"

    with pytest.raises(ConfigError, match="train.grad_checkpointing=false"):
        enable_grad_checkpointing(NoCheckpointing(), "somenet")


def test_checkpointed_resnet_keeps_its_names_and_a_deep_copy_runs_its_own_weights():
    import copy

    enc = build_encoder("resnet10t", image_size=32, small_image_stem=False, dim=8)
    names = list(enc.state_dict())
    enable_grad_checkpointing(enc.backbone, "resnet10t")
    assert list(enc.state_dict()) == names  # the exported weights keep timm's names
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        twin.backbone.conv1[0].weight.mul_(-1.0)
        x = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(enc(x), twin(x))
    x.requires_grad_(False)
    enc(x).sum().backward()  # checkpointed stem and stages under autograd
    assert enc.backbone.conv1[0].weight.grad is not None

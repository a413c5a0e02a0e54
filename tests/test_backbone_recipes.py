"""Any timm backbone on every shipped recipe: each recipe's model section, with model.arch set to
one of the common families, builds and takes one real MoCo training step.

Recipes come from the recipes/ folder as it is; model sections that are equal once model.arch
is set are run once (the test id names every recipe sharing it). Images are 32 px and batches
4, so the matrix stays cheap; the default run takes a cover of it (see matrix), -m slow the rest.
"""

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator

from lowmem_moco.backbones import encoder_from_config, output_width
from lowmem_moco.config import load_config
from lowmem_moco.engine.moco import MoCo
from lowmem_moco.engine.step import MoCoStep
from lowmem_moco.optim import build_optimizer
from support import RECIPES

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
ARCHS = ["resnet18", "resnet50", "convnext_atto", "mobilenetv3_small_050", "efficientnet_b0", "regnetx_002",
         "vit_tiny_patch16_224"]
# A tiny step, whatever the recipe's own batch: 4 images of 32 px, micro-batches and key chunks of 2.
TINY_STEP = ["data.image_size=32", "train.batch_size=4", "train.micro_batch_size=2", "moco.key_chunks=2",
             "moco.queue_size=8", "moco.symmetric=false"]


def matrix() -> list:
    cases: dict[str, tuple[str, list[str]]] = {}
    for arch in ARCHS:
        for recipe in sorted(RECIPES.glob("*.yaml")):
            cfg = load_config(recipe, [f"model.arch={arch}", *TINY_STEP])
            section = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
            cases.setdefault(section, (arch, []))[1].append(recipe)
    params, families = [], set()
    for arch, recipes in cases.values():
        # The default run: every recipe's model section with the first family, and every family
        # once (on its first recipes); the rest of the matrix (about 15 s) runs with -m slow.
        default = arch == ARCHS[0] or arch not in families
        families.add(arch)
        params.append(pytest.param(recipes[0], arch, id=f"{'+'.join(r.stem for r in recipes)}-{arch}",
                                   marks=[] if default else [pytest.mark.slow]))
    return params


@pytest.mark.parametrize("recipe,arch", matrix())
def test_recipe_model_section_trains_one_step_with_any_family(recipe, arch):
    cfg = load_config(recipe, [f"model.arch={arch}", *TINY_STEP])
    torch.manual_seed(0)
    encoder = encoder_from_config(cfg)
    head_in = encoder.head.in_features if isinstance(encoder.head, torch.nn.Linear) else encoder.head[0].in_features
    assert head_in == output_width(encoder.backbone, 32)
    moco = MoCo(encoder, cfg.moco.queue_size, cfg.model.dim)
    optimizer = build_optimizer(moco.encoder_q.parameters(), cfg)
    step = MoCoStep(moco, optimizer, Accelerator(cpu=True), micro_batch=cfg.micro_batch,
                    key_chunks=cfg.moco.key_chunks, temperature=cfg.moco.temperature)
    before = [p.detach().clone() for p in moco.encoder_q.parameters()]
    views = torch.randn(2, 4, 3, 32, 32)
    result = step(views[0], views[1], cfg.moco.momentum, torch.Generator().manual_seed(0))
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))
    moved = [not torch.equal(b, p) for b, p in zip(before, moco.encoder_q.parameters())]
    assert sum(moved) > len(moved) // 2  # the step reached the backbone, not only the head
    assert int(moco.queue_ptr) == 4

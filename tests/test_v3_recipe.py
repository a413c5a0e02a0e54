"""The small MoCo v3 recipe trains through the trainer (gradient cache, ViT options, v3 views,
AdamW with warm-up), resumes, and exports; on synthetic images, its model made shallow."""

from __future__ import annotations

import json

import torch

from lowmem_moco.checkpoint import list_checkpoints, read_meta
from lowmem_moco.config import load_config
from lowmem_moco.trainer import Trainer
from support import RECIPES

SMALL = ["data.source=synthetic", "data.synthetic_size=96", "data.image_size=32", "data.num_workers=0",
         "model.timm_kwargs.depth=2", "model.head_hidden_dim=64", "train.batch_size=32",
         "train.micro_batch_size=8", "moco.key_chunks=2", "train.epochs=2", "train.warmup_epochs=1",
         "eval.knn_every=1", "eval.knn_k=10", "train.checkpoint_every=2"]


def test_the_small_mocov3_recipe_trains_resumes_and_exports(tmp_path, one_cpu_thread):
    cfg = load_config(RECIPES / "imagenette_vit_tiny_mocov3.yaml", [*SMALL, f"output_dir={tmp_path}",
                                                                     "train.max_steps=2"])
    first = Trainer(cfg)
    patch = first.moco.encoder_q.backbone.patch_embed.proj.weight.detach().clone()
    first.fit()
    assert not first.moco.encoder_q.backbone.patch_embed.proj.weight.requires_grad
    assert torch.equal(first.moco.encoder_q.backbone.patch_embed.proj.weight, patch)  # frozen: never trained
    assert read_meta(list_checkpoints(tmp_path)[-1])["step"] == 2

    resumed = Trainer(load_config(RECIPES / "imagenette_vit_tiny_mocov3.yaml", [*SMALL, f"output_dir={tmp_path}"]))
    assert resumed.step == 2
    last = resumed.fit()
    assert resumed.step == 6 and torch.isfinite(torch.tensor(last["loss"]))  # 96 // 32 = 3 steps an epoch
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert (tmp_path / "backbone.safetensors").is_file()

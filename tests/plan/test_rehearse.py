"""The rehearsal: every recipe's CUDA path on fake CUDA tensors, its failures and its sync count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.engine import moco as moco_module
from lowmem_moco.engine import step as step_module
from lowmem_moco.plan.fake_cuda import RehearsalError
from lowmem_moco.plan.predict import gpu
from lowmem_moco.plan.rehearse import rehearse

RECIPES = sorted(Path("recipes").glob("*.yaml"))
# Each recipe's model and step settings, at a size a 2-core CPU rehearses in seconds.
SMALL = ["train.batch_size=8", "train.micro_batch_size=4", "moco.key_chunks=2", "data.image_size=32",
         "moco.queue_size=64"]
TINY = ["model.arch=resnet18", "model.small_image_stem=true", "model.timm_kwargs.channels=[8,16,32,64]",
        "data.source=synthetic", "train.precision=fp16"] + SMALL

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
# The notebook's recipe (fp16, channels_last) rehearses in the default run; the others take up to
# 10 s each (ResNet-50, ViT, MoCo v3) and run with -m slow, as CI does.
DEFAULT_RUN = {"cifar10_resnet18"}


@pytest.mark.parametrize("card", ["t4", "a100-40"])
@pytest.mark.parametrize("recipe", [pytest.param(p, id=p.stem, marks=[] if p.stem in DEFAULT_RUN else
                                                 [pytest.mark.slow]) for p in RECIPES])
def test_every_recipe_rehearses_on_fake_cuda_with_at_most_two_syncs_per_step(recipe, card):
    cfg = load_config(str(recipe), SMALL)
    result = rehearse(cfg, gpu(card), steps=1)  # test_the_sync_counter_... runs a second step
    assert result.ok and result.syncs_per_step <= 2, result.syncs
    if cfg.train.precision in ("fp16", "bf16"):
        assert result.precision == ("fp16" if card == "t4" else cfg.train.precision)
    assert result.cuda_ops_per_step > 0 and result.peak_bytes > 0


def test_a_cpu_tensor_inside_the_step_fails_with_its_file_and_line(monkeypatch):
    def info_nce_with_a_cpu_tensor(q, *args):
        return (q.float().sum() * torch.ones(3)).sum()  # a CPU tensor meets a CUDA one

    monkeypatch.setattr(step_module, "info_nce", info_nce_with_a_cpu_tensor)
    with pytest.raises(RehearsalError, match=r"lowmem_moco/engine/step\.py:\d+: a CUDA tensor met a CPU tensor"):
        rehearse(load_config(None, TINY), gpu("t4"), steps=1)


def test_the_sync_counter_counts_a_read_inside_the_micro_batch_loop(monkeypatch):
    cfg = load_config(None, TINY + ["train.precision=bf16"])
    clean = rehearse(cfg, gpu("a100-40"), steps=2)
    assert clean.syncs_per_step == 1 and clean.precision == "bf16"  # a100: bf16, no loss scaler

    def info_nce_read_every_micro_batch(*args):
        loss = moco_module.info_nce(*args)
        loss.item()  # what a debug print of the loss would do
        return loss

    monkeypatch.setattr(step_module, "info_nce", info_nce_read_every_micro_batch)
    result = rehearse(cfg, gpu("a100-40"), steps=2)
    micro_batches = cfg.train.batch_size // cfg.micro_batch
    assert result.syncs_per_step == clean.syncs_per_step + micro_batches
    # the read is attributed to the step's line that called the loss (the test's own function is not the package's)
    assert result.sync_sites[0].startswith("lowmem_moco/engine/step.py:") and len(result.sync_sites) == 2


def test_cli_json_and_one_line_for_a_bad_card(capsys):
    assert main(["rehearse", "recipes/demo.yaml", *TINY, "--gpu", "t4", "--steps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["precision"] == "fp16" and out["syncs_per_step"] <= 2
    assert {"sync_sites", "cuda_ops_per_step", "peak_bytes", "stand_ins"} <= set(out)
    assert main(["rehearse", "recipes/demo.yaml", "--gpu", "v100"]) == 2
    assert "known GPUs" in capsys.readouterr().err


def test_a_cpu_tensor_in_the_backward_fails_with_the_line_that_started_the_backward(monkeypatch):
    class HostGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):
            return (grad * torch.ones(1)).sum()  # a CPU tensor meets a CUDA one, in the backward only

    def info_nce_with_a_host_backward(*args):
        return HostGradient.apply(moco_module.info_nce(*args))

    monkeypatch.setattr(step_module, "info_nce", info_nce_with_a_host_backward)
    with pytest.raises(RehearsalError, match=r"lowmem_moco/engine/step\.py:\d+: a CUDA tensor met a CPU tensor"):
        rehearse(load_config(None, TINY), gpu("t4"), steps=1)

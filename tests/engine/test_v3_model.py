"""MoCo v3's model (the official heads), the decoupled loss against the paper's formula (v2's
queue and v3's batch), v3's config checks, its planning, and a whole v3 run (resume, export)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lowmem_moco.backbones import V3_HIDDEN_DIM, v3_mlp
from lowmem_moco.engine.moco import MoCo, in_batch_nce, info_nce
from lowmem_moco.engine.step import MoCoStep
from lowmem_moco.errors import ConfigError
from lowmem_moco.factory import build_model
from lowmem_moco.validation import validate, validate_for_processes
from test_gradcache import M, T, close, official_ctr, official_mlp, v3_config


@pytest.mark.parametrize("arch,layers", [("vit_tiny_patch16_224", 3), ("test_resnet", 2)])
def test_heads_are_the_official_mlps(arch, layers):
    moco = build_model(v3_config(arch=arch), "cpu")
    width = moco.encoder_q.head[0].in_features
    for ours, theirs in ((moco.encoder_q.head, official_mlp(layers, width, 64, 32)),
                         (moco.predictor, official_mlp(2, 32, 64, 32, last_bn=False))):
        assert [repr(x) for x in ours] == [repr(x) for x in theirs]
    assert V3_HIDDEN_DIM == 4096 and v3_mlp(2, 8, V3_HIDDEN_DIM, 4, True)[0].out_features == 4096


# ---------------------------------------------------------------- the decoupled loss


def test_dcl_in_batch_matches_the_paper_formula():
    torch.manual_seed(1)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    s = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()  # s(q_i, k_j)
    per_query = [-s[i, i] / T + torch.log(sum(torch.exp(s[i, j] / T) for j in range(6) if j != i))
                 for i in range(6)]
    expected = torch.stack(per_query).mean() * 2 * T
    close(in_batch_nce(q, k, T, decoupled=True), expected)
    close(in_batch_nce(q, k, T), official_ctr(q, k))
    assert not torch.allclose(in_batch_nce(q, k, T, decoupled=True), in_batch_nce(q, k, T))


def test_dcl_with_a_queue_matches_the_paper_formula():
    torch.manual_seed(2)
    q, k, queue = torch.randn(6, 8), F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(20, 8), dim=1)
    qn = F.normalize(q, dim=1)
    expected = (-(qn * k).sum(1) / T + torch.log(torch.exp(qn @ queue.t() / T).sum(1))).mean()
    close(info_nce(q, k, queue, T, decoupled=True), expected)


def test_v2_step_trains_with_the_decoupled_loss():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    moco = MoCo(enc, 32, 8)
    queue = moco.queue.clone()
    xq, xk = torch.randn(16, 3, 2, 2), torch.randn(16, 3, 2, 2)
    with torch.no_grad():
        q, k = enc(xq), F.normalize(enc(xk), dim=1)  # f_k = f_q before the first update
    expected = info_nce(q, k, queue, T, decoupled=True).item()
    step = MoCoStep(moco, torch.optim.SGD(enc.parameters(), lr=0.1), Accelerator(cpu=True), micro_batch=16,
                    key_chunks=1, temperature=T, decoupled=True)
    assert step(xq, xk, M).loss == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- config, planner, runs


@pytest.mark.parametrize("key,value,named", [("model.head", "linear", "model.head"),
                                             ("moco.symmetric", True, "moco.symmetric")])
def test_v3_refuses_v2_only_keys_naming_them(key, value, named):
    cfg = v3_config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


def test_v3_warns_of_an_unused_queue_and_runs_on_one_process_only():
    cfg = v3_config()
    cfg.moco.queue_size = 8  # v2 would refuse a queue smaller than the batch
    with pytest.warns(UserWarning, match="moco.queue_size"):
        validate(cfg)
    with pytest.raises(ConfigError, match="moco.version=v3"):
        validate_for_processes(cfg, world=2, micro=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(v3_config())


def test_the_planner_plans_the_cached_step_below_the_whole_batch():
    from lowmem_moco.plan.predict import PlannedStep

    cfg = v3_config(drop_path=0.1)
    cfg.train.batch_size, cfg.model.head_hidden_dim = 64, None  # the default 4096-wide heads
    planned = PlannedStep(cfg, precision="no", checkpointing=False)
    cached, whole = planned.predict(micro_batch=8), planned.predict(micro_batch=64)
    assert 0 < cached.peak_bytes < whole.peak_bytes


def test_a_v3_run_resumes_exactly_and_exports_its_backbone(tmp_path):
    from test_train_e2e import final_state, run

    v3 = ["moco.version=v3", "model.head_hidden_dim=32", "train.max_steps=4", "train.checkpoint_every=2"]
    run(tmp_path / "whole", *v3)
    run(tmp_path / "parts", *v3[:-2], "train.max_steps=2")
    run(tmp_path / "parts", *v3)
    (a, step_a), (b, step_b) = final_state(tmp_path / "whole"), final_state(tmp_path / "parts")
    assert step_a == step_b == 4 and a.keys() == b.keys()
    assert any(name.startswith("model.predictor.") for name in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "parts" / "backbone.safetensors").exists()

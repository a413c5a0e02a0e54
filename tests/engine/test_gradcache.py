"""MoCo v3 through the representation-gradient cache, and the decoupled loss, against small,
obviously-correct references (fp32, CPU).

Tolerance of the equivalences: the loss within 1e-6 relative; every element of every
parameter's gradient (and of every parameter and buffer after two optimizer steps) within
REL = 1e-5 of the largest magnitude among all the gradients (all the parameters and buffers)
compared. Scaled by the whole set, not per tensor: some gradients are zero but for rounding
(the final LayerNorm's bias feeds a BatchNorm, which removes any shift). What separates
the compared computations is float summation order only (batch sizes of the matrix products,
the order of backward passes); any error in the maths moves gradients by far more.
"""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lowmem_moco.backbones import V3_HIDDEN_DIM, v3_mlp
from lowmem_moco.config import Config
from lowmem_moco.engine import gradcache
from lowmem_moco.engine.keys import encode_keys
from lowmem_moco.engine.moco import MoCo, in_batch_nce, info_nce
from lowmem_moco.engine.step import MoCoStep
from lowmem_moco.errors import ConfigError
from lowmem_moco.factory import build_model, make_step
from lowmem_moco.validation import validate, validate_for_processes

REL = 1e-5
B, T, M = 16, 0.2, 0.99


def v3_config(drop_path=0.0, arch="vit_tiny_patch16_224", loss="infonce"):
    cfg = Config()
    cfg.moco.version, cfg.moco.loss, cfg.moco.temperature, cfg.moco.key_chunks = "v3", loss, T, 2
    cfg.model.arch, cfg.data.image_size = arch, 32
    cfg.model.dim, cfg.model.head_hidden_dim = 32, 64
    if arch.startswith("vit"):
        cfg.model.timm_kwargs = {"depth": 2, "patch_size": 8, "drop_path_rate": drop_path}
    cfg.train.batch_size = B
    return cfg


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of each step, for comparing them."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def v3_pair(cfg):
    torch.manual_seed(0)
    moco = build_model(cfg, "cpu")
    return moco, copy.deepcopy(moco)


def sgd(moco):
    return RecordingSGD(moco.trained_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)


def batches(n=2):
    torch.manual_seed(5)
    return [(torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)) for _ in range(n)]


def close(x, y, name="", scale=None):
    """x equals the reference y: a scalar to 1e-6 relative, a tensor to REL x `scale` (default:
    y's largest magnitude)."""
    x, y = torch.as_tensor(x).float(), torch.as_tensor(y).float()
    if y.dim() == 0 and scale is None:
        return torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=name or None)
    scale = float(y.abs().max()) if scale is None else scale
    torch.testing.assert_close(x, y, rtol=0, atol=REL * scale, msg=name or None)


def close_all(xs, ys, names):
    ys = [y.float() for y in ys]
    scale = max(float(y.abs().max()) for y in ys if y.numel() and y.dim())  # v3's queue is empty
    for x, y, name in zip(xs, ys, names):
        close(x, y, name, scale)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    close_all(a.state_dict().values(), b.state_dict().values(), list(a.state_dict()))


def assert_same_grads(opt_a, opt_b):
    close_all(opt_a.grads, opt_b.grads, [f"gradient {i}" for i in range(len(opt_b.grads))])


# ---------------------------------------------------------------- cached = whole batch


@pytest.mark.parametrize("micro", [2, 4, 8])
def test_cached_step_equals_the_whole_batch_step(micro):
    cfg = v3_config()
    moco, ref = v3_pair(cfg)
    opt, ref_opt = sgd(moco), sgd(ref)
    acc = Accelerator(cpu=True)
    cached, whole = make_step(cfg, moco, opt, acc, micro), make_step(cfg, ref, ref_opt, acc, B)
    assert isinstance(cached, gradcache.GradCacheStep)
    for x1, x2 in batches():
        a = cached(x1, x2, M, torch.Generator().manual_seed(1))
        b = whole(x1, x2, M, torch.Generator().manual_seed(1))
        close(a.loss, b.loss)
        assert_same_grads(opt, ref_opt)
    assert_same_state(moco, ref)


def chunked_reference_step(moco, opt, x1, x2, micro, generator):
    """The v3 step with one autograd graph over the whole batch, the query backbone called per
    micro-batch (so that drop path draws its masks in the cached step's order): what the cache
    must reproduce, with no cache."""
    moco.momentum_update(M)
    with torch.no_grad():
        k1, k2 = (moco.encoder_k.head(encode_keys(moco.encoder_k.backbone, x, 2, generator, normalize=False))
                  for x in (x1, x2))
    q1, q2 = (moco.predictor(moco.encoder_q.head(torch.cat([moco.encoder_q.backbone(part)
                                                            for part in x.split(micro)])))
              for x in (x1, x2))
    loss = official_ctr(q1, k2) + official_ctr(q2, k1)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("replay", [True, False])
def test_drop_path_masks_are_replayed_in_the_second_forward(replay, monkeypatch):
    if not replay:  # the second forward draws new masks: the gradient is no longer the loss's
        monkeypatch.setattr(gradcache, "replayed_rng", lambda state, device: contextlib.nullcontext())
    cfg, micro = v3_config(drop_path=0.5), 4
    moco, ref = v3_pair(cfg)
    opt, ref_opt = sgd(moco), sgd(ref)
    step = make_step(cfg, moco, opt, Accelerator(cpu=True), micro)
    for x1, x2 in batches():
        torch.manual_seed(9)
        loss = step(x1, x2, M, torch.Generator().manual_seed(1)).loss
        rng_after = torch.get_rng_state()
        torch.manual_seed(9)
        ref_loss = chunked_reference_step(ref, ref_opt, x1, x2, micro, torch.Generator().manual_seed(1))
        if not replay:
            assert not torch.allclose(opt.grads[0], ref_opt.grads[0], rtol=1e-3, atol=1e-5)
            return
        close(loss, ref_loss)
        assert_same_grads(opt, ref_opt)
        assert torch.equal(rng_after, torch.get_rng_state())  # the step drew the numbers of one pass
    assert_same_state(moco, ref)


# ---------------------------------------------------------------- whole batch = the official builder.py


def official_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco-v3 builder.py's _build_mlp, restated."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(torch.nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp += [torch.nn.BatchNorm1d(dim2), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(torch.nn.BatchNorm1d(dim2, affine=False))
    return torch.nn.Sequential(*mlp)


def official_ctr(q, k):
    """builder.py's contrastive loss for one process: labels arange(N), times 2T."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / T
    return F.cross_entropy(logits, torch.arange(len(q))) * (2 * T)


def official_v3_step(base_encoder, momentum_encoder, predictor, opt, x1, x2, m):
    """builder.py's MoCo.forward on one process, then main_moco.py's backward and step."""
    q1, q2 = predictor(base_encoder(x1)), predictor(base_encoder(x2))
    with torch.no_grad():
        for param_b, param_m in zip(base_encoder.parameters(), momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)
        k1, k2 = momentum_encoder(x1), momentum_encoder(x2)
    loss = official_ctr(q1, k2) + official_ctr(q2, k1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("arch,layers", [("vit_tiny_patch16_224", 3), ("test_resnet", 2)])
def test_heads_are_the_official_mlps(arch, layers):
    moco = build_model(v3_config(arch=arch), "cpu")
    width = moco.encoder_q.head[0].in_features
    for ours, theirs in ((moco.encoder_q.head, official_mlp(layers, width, 64, 32)),
                         (moco.predictor, official_mlp(2, 32, 64, 32, last_bn=False))):
        assert [repr(x) for x in ours] == [repr(x) for x in theirs]
    assert V3_HIDDEN_DIM == 4096 and v3_mlp(2, 8, V3_HIDDEN_DIM, 4, True)[0].out_features == 4096


def test_whole_batch_step_equals_the_official_builder():
    cfg = v3_config()
    moco, _ = v3_pair(cfg)
    base, mom, pred = (copy.deepcopy(x) for x in (moco.encoder_q, moco.encoder_k, moco.predictor))
    opt = sgd(moco)
    ref_opt = RecordingSGD([*base.parameters(), *pred.parameters()], lr=0.5, momentum=0.9, weight_decay=1e-4)
    step = make_step(cfg, moco, opt, Accelerator(cpu=True), B)
    for x1, x2 in batches():
        loss = step(x1, x2, M, torch.Generator().manual_seed(1)).loss
        close(loss, official_v3_step(base, mom, pred, ref_opt, x1, x2, M))
        assert_same_grads(opt, ref_opt)
    for ours, theirs in ((moco.encoder_q, base), (moco.encoder_k, mom), (moco.predictor, pred)):
        assert_same_state(ours, theirs)


# ---------------------------------------------------------------- BatchNorm backbones, loss scaling


def test_batchnorm_backbone_statistics_are_updated_once_per_image():
    cfg, micro = v3_config(arch="test_resnet"), 4
    moco, ref = v3_pair(cfg)
    make_step(cfg, moco, sgd(moco), Accelerator(cpu=True), micro)(*batches(1)[0], M, torch.Generator().manual_seed(1))
    with torch.no_grad():  # the first pass alone: each micro-batch of each view forwarded once
        for x in batches(1)[0]:
            for part in x.split(micro):
                ref.encoder_q.backbone(part)
    counts = [b for n, b in moco.encoder_q.backbone.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 2 * B // micro for c in counts)  # not twice that: the replay is undone
    ours, theirs = dict(moco.encoder_q.backbone.named_buffers()), dict(ref.encoder_q.backbone.named_buffers())
    close_all(ours.values(), theirs.values(), list(ours))


class ScalingAccelerator:
    """accelerate's backward with a fixed fp16 loss scale S, for checking where scaling happens."""

    num_processes, scale = 1, 1024.0

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss * self.scale).backward()


def test_the_loss_scale_reaches_every_gradient_exactly_once():
    cfg = v3_config()
    moco, ref = v3_pair(cfg)
    opt, ref_opt = sgd(moco), sgd(ref)
    x1, x2 = batches(1)[0]
    make_step(cfg, moco, opt, ScalingAccelerator(), 4)(x1, x2, M, torch.Generator().manual_seed(1))
    make_step(cfg, ref, ref_opt, Accelerator(cpu=True), 4)(x1, x2, M, torch.Generator().manual_seed(1))
    close_all(opt.grads, [g * ScalingAccelerator.scale for g in ref_opt.grads], range(len(opt.grads)))


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

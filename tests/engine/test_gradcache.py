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

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lowmem_moco.config import Config
from lowmem_moco.engine import gradcache
from lowmem_moco.engine.keys import encode_keys
from lowmem_moco.factory import build_model, make_step

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

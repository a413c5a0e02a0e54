"""The MoCo maths against small, obviously-correct references (fp32, CPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lowmem_moco.backbones import build_encoder, enable_grad_checkpointing
from lowmem_moco.engine.keys import encode_keys
from lowmem_moco.engine.moco import MoCo, info_nce, momentum_at
from lowmem_moco.engine.step import MoCoStep


def tiny_encoder(arch="test_resnet", dim=16):
    torch.manual_seed(0)
    return build_encoder(arch, image_size=32, small_image_stem=False, dim=dim)


# ---------------------------------------------------------------- queue, EMA, loss


@pytest.mark.parametrize("size,batches", [(10, [4, 4, 4, 4]), (7, [3, 5, 2, 7]), (8, [8, 8])])
def test_enqueue_is_a_fifo_of_the_last_k_keys_for_any_k_and_batch(size, batches):
    moco = MoCo(torch.nn.Linear(2, 3), queue_size=size, dim=3)
    history = []
    for n in batches:
        keys = F.normalize(torch.randn(n, 3), dim=1)
        moco.enqueue(keys)
        history += list(keys)
    ptr = int(moco.queue_ptr)
    assert ptr == sum(batches) % size
    # Reading the ring from the pointer gives the newest `size` keys, oldest first.
    ring = torch.cat([moco.queue[ptr:], moco.queue[:ptr]])
    assert torch.equal(ring, torch.stack(history[-size:]))


def test_momentum_update_matches_the_formula_on_parameters_only():
    moco = MoCo(torch.nn.BatchNorm1d(4), queue_size=4, dim=4)
    with torch.no_grad():
        moco.encoder_q.weight.add_(1.0)
        moco.encoder_q.running_mean.add_(5.0)
    k_before = moco.encoder_k.weight.clone()
    moco.momentum_update(0.9)
    assert torch.allclose(moco.encoder_k.weight, 0.9 * k_before + 0.1 * moco.encoder_q.weight)
    assert torch.equal(moco.encoder_k.running_mean, torch.zeros(4))  # buffers are the key encoder's own
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_info_nce_matches_the_explicit_softmax_formula():
    torch.manual_seed(1)
    q, k = torch.randn(6, 8), F.normalize(torch.randn(6, 8), dim=1)
    queue, t = F.normalize(torch.randn(20, 8), dim=1), 0.2
    qn = q / q.norm(dim=1, keepdim=True)
    pos = torch.exp((qn * k).sum(1) / t)
    neg = torch.exp(qn @ queue.t() / t).sum(1)
    expected = -torch.log(pos / (pos + neg)).mean()
    assert torch.allclose(info_nce(q, k, queue, t), expected, atol=1e-6)


def test_info_nce_stays_fp32_under_autocast():
    q = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(16, 8), dim=1), 0.1)
    assert loss.dtype == torch.float32


def test_cosine_momentum_rises_from_base_to_one():
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    # BYOL's 1 - (1 - base)(cos(pi k / K) + 1) / 2: half-way there at half the steps, a quarter at a quarter
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(25, 100, 0.99, "cosine") == pytest.approx(1 - 0.01 * (2 ** 0.5 / 2 + 1) / 2)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99, "constant") == 0.99


# ---------------------------------------------------------------- sequential-chunk keys


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])  # BatchNorm2d, timm BatchNormAct2d
@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_keys_equal_encoding_each_shuffled_chunk_separately(arch, channels_last):
    enc = tiny_encoder(arch).train()
    x = torch.randn(12, 3, 32, 32)
    if channels_last:
        enc = enc.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ref_enc = copy.deepcopy(enc)
    keys = encode_keys(enc, x, num_chunks=3, generator=torch.Generator().manual_seed(7))

    perm = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    expected = torch.empty(12, 16)
    with torch.no_grad():
        for chunk in perm.view(3, 4):  # what 3 GPUs would each encode
            expected[chunk] = F.normalize(ref_enc(x[chunk].contiguous()), dim=1)
    assert torch.allclose(keys, expected, atol=1e-5)
    # Not what one BatchNorm over the whole batch would give: the split is real.
    with torch.no_grad():
        whole = F.normalize(copy.deepcopy(ref_enc)(x), dim=1)
    assert not torch.allclose(keys, whole, atol=1e-3)


# ---------------------------------------------------------------- the whole step


def official_multi_gpu_step(enc_q, enc_k, queue, ptr, opt, xq, xk, gpus, m, t, perm_gen):
    """The official MoCo v2 step on `gpus` simulated GPUs: DDP replicas of f_q with per-GPU
    BatchNorm, the key batch shuffled across GPUs, gradients averaged, one enqueue.
    queue is CxK as in the official code; returns (keys in batch order, new ptr)."""
    with torch.no_grad():
        for pk, pq in zip(enc_k.parameters(), enc_q.parameters()):
            pk.data = pk.data * m + pq.data * (1.0 - m)
    n = xq.shape[0]
    idx_shuffle = torch.randperm(n, generator=perm_gen)
    idx_unshuffle = torch.argsort(idx_shuffle)
    with torch.no_grad():
        k_shuffled = torch.cat([F.normalize(enc_k(part), dim=1) for part in xk[idx_shuffle].chunk(gpus)])
    k_all = k_shuffled[idx_unshuffle]

    grads = [torch.zeros_like(p) for p in enc_q.parameters()]
    for g, (xq_g, k_g) in enumerate(zip(xq.chunk(gpus), k_all.chunk(gpus))):
        replica = copy.deepcopy(enc_q)
        q = F.normalize(replica(xq_g), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k_g).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.clone())
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        loss.backward()
        for acc, p in zip(grads, replica.parameters()):
            acc += p.grad / gpus  # DDP all-reduce: mean over GPUs
    for p, g in zip(enc_q.parameters(), grads):
        p.grad = g
    opt.step()
    opt.zero_grad()
    queue[:, ptr:ptr + n] = k_all.t()
    return k_all, (ptr + n) % queue.shape[1]


def test_step_with_micro_batches_equals_the_simulated_4_gpu_official_step():
    gpus, micro, batch, size, dim, t, m = 4, 8, 32, 64, 16, 0.2, 0.99
    moco = MoCo(tiny_encoder(dim=dim), queue_size=size, dim=dim)
    ref_q, ref_k = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k)
    ref_queue, ref_ptr = moco.queue.t().clone(), 0
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(ref_q.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    step = MoCoStep(moco, opt, Accelerator(cpu=True), micro_batch=micro, key_chunks=gpus, temperature=t)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)

    torch.manual_seed(5)
    for _ in range(3):  # the queue fills and wraps; SGD momentum is exercised
        xq, xk = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)
        ptr_before = int(moco.queue_ptr)
        result = step(xq, xk, m, gen)
        ref_keys, ref_ptr = official_multi_gpu_step(ref_q, ref_k, ref_queue, ref_ptr, ref_opt, xq, xk,
                                                     gpus, m, t, ref_gen)
        assert not result.skipped
        assert int(moco.queue_ptr) == ref_ptr
        new_keys = moco.queue[ptr_before:ptr_before + batch]
        assert torch.allclose(new_keys, ref_keys, atol=1e-5)

    for (name, p), p_ref in zip(moco.encoder_q.named_parameters(), ref_q.parameters()):
        assert torch.allclose(p, p_ref, atol=1e-5, rtol=1e-4), name
    for p, p_ref in zip(moco.encoder_k.parameters(), ref_k.parameters()):
        assert torch.allclose(p, p_ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(moco.queue, ref_queue.t(), atol=1e-5)


def test_accumulated_gradient_equals_the_full_batch_gradient_without_batchnorm():
    """With no BatchNorm, 4 micro-batches must give exactly the one-batch gradient."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    moco_a, moco_b = MoCo(enc, 32, 8), MoCo(copy.deepcopy(enc), 32, 8)
    moco_b.load_state_dict(moco_a.state_dict())
    opts = [torch.optim.SGD(x.encoder_q.parameters(), lr=1.0) for x in (moco_a, moco_b)]
    acc = Accelerator(cpu=True)
    xq, xk = torch.randn(16, 3, 2, 2), torch.randn(16, 3, 2, 2)
    MoCoStep(moco_a, opts[0], acc, micro_batch=4, key_chunks=1, temperature=0.1)(xq, xk, 0.9)
    MoCoStep(moco_b, opts[1], acc, micro_batch=16, key_chunks=1, temperature=0.1)(xq, xk, 0.9)
    for pa, pb in zip(moco_a.parameters(), moco_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert torch.equal(moco_a.queue, moco_b.queue)


def test_symmetric_loss_enqueues_both_directions_once():
    moco = MoCo(tiny_encoder(), queue_size=64, dim=16)
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
    step = MoCoStep(moco, opt, Accelerator(cpu=True), micro_batch=4, key_chunks=2, temperature=0.2, symmetric=True)
    step(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), 0.99)
    assert int(moco.queue_ptr) == 16  # 2 x 8 keys, one enqueue


def test_grad_checkpointing_gives_the_same_step_and_running_stats():
    results = []
    for ckpt in (False, True):
        enc = tiny_encoder("resnet10t")
        if ckpt:
            enable_grad_checkpointing(enc.backbone, "resnet10t")
        moco = MoCo(enc, queue_size=32, dim=16)
        opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
        torch.manual_seed(1)
        x = torch.randn(8, 3, 32, 32)
        MoCoStep(moco, opt, Accelerator(cpu=True), micro_batch=4, key_chunks=2, temperature=0.2,
                 guard_bn_stats=ckpt)(x, x.flip(3), 0.99, torch.Generator().manual_seed(0))
        results.append(moco.state_dict())
    for name, value in results[0].items():
        assert torch.allclose(value.float(), results[1][name].float(), atol=1e-5), name


def test_non_finite_loss_skips_the_update():
    moco = MoCo(tiny_encoder(), queue_size=32, dim=16)
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
    before = copy.deepcopy(moco.state_dict())
    x = torch.full((8, 3, 32, 32), float("nan"))
    result = MoCoStep(moco, opt, Accelerator(cpu=True), micro_batch=4, key_chunks=2, temperature=0.2)(x, x, 0.99)
    assert result.skipped
    for name in ("queue", "queue_ptr"):
        assert torch.equal(moco.state_dict()[name], before[name])
    q_params = {k: v for k, v in moco.state_dict().items() if k.startswith("encoder_q") and "running" not in k
                and "num_batches" not in k}
    assert all(torch.equal(v, before[k]) for k, v in q_params.items())

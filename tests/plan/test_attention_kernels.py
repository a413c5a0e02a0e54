"""The attention kernel a card runs, on fake CUDA: PyTorch's choice by capability, dtype and
head size, and what it changes in the planner's CUDA-rules prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowmem_moco.config import load_config
from lowmem_moco.plan.attention_kernels import kernel_for
from lowmem_moco.plan.fake_cuda import FakeCuda
from lowmem_moco.plan.predict import PlannedStep, gpu

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _q(dtype, head_dim=64):
    return torch.empty(2, 3, 17, head_dim, dtype=dtype, device="meta")


@pytest.mark.parametrize("capability, dtype, head_dim, masked, kernel", [
    ((8, 0), torch.bfloat16, 64, False, "flash"),
    ((9, 0), torch.float16, 256, False, "flash"),
    ((8, 0), torch.float16, 64, True, "efficient"),  # flash takes no attention mask
    ((8, 0), torch.float32, 64, False, "efficient"),  # flash is half precision only
    ((7, 5), torch.float16, 64, False, "efficient"),  # a T4: no flash before compute capability 8.0
    ((7, 5), torch.bfloat16, 64, False, "math"),  # bf16 kernels need 8.0
    ((8, 0), torch.float16, 12, False, "math"),  # head dim not a multiple of 8
    ((8, 0), torch.float16, 264, False, "efficient"),  # over flash's 256
    ((4, 0), torch.float16, 64, False, "math"),
])
def test_the_kernel_follows_pytorchs_order_and_conditions(capability, dtype, head_dim, masked, kernel):
    mask = torch.empty(17, 17, dtype=torch.bool, device="meta") if masked else None
    assert kernel_for(capability, _q(dtype, head_dim), mask, enable_gqa=False) == kernel


def test_a_fused_kernel_replaces_the_math_one_and_keeps_no_attention_matrix():
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        with FakeCuda(capability) as cuda:
            q = torch.empty(2, 3, 197, 64, device="cuda", dtype=dtype, requires_grad=True)
            out = F.scaled_dot_product_attention(q, q, q)
            saved = _saved_shapes(out.grad_fn)
            out.sum().backward()
        assert "attention kernel" in cuda.watch.stand_ins_used
        assert saved and not [s for s in saved if tuple(s[-2:]) == (197, 197)]  # the math kernel keeps NxN
        assert q.grad.shape == q.shape


def _saved_shapes(root) -> list:
    """Shapes of every tensor the graph under `root` saved for its backward."""
    shapes, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        shapes += [getattr(node, name).shape for name in dir(node)
                   if name.startswith("_saved_") and isinstance(getattr(node, name), torch.Tensor)]
        todo += [next_node for next_node, _ in node.next_functions]
    return shapes


def test_a_vit_is_planned_on_cuda_rules_with_the_cards_kernel():
    cfg = load_config(None, ["model.arch=vit_tiny_patch16_224", "model.timm_kwargs.img_size=64",
                             "model.timm_kwargs.depth=2", "data.image_size=64", "train.batch_size=8",
                             "moco.version=v3", "moco.key_chunks=2", "train.optimizer=adamw", "data.source=synthetic"])
    cpu_rules = PlannedStep(cfg, "fp16", False).predict(4)
    cuda_rules = PlannedStep(cfg, "fp16", False, card=gpu("t4"))
    predicted = cuda_rules.predict(4)
    assert "attention kernel" in cuda_rules.cuda.watch.stand_ins_used
    assert abs(predicted.peak_bytes / cpu_rules.peak_bytes - 1) < 0.02

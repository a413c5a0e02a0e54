"""The fused attention kernel a card runs for `scaled_dot_product_attention`, on fake CUDA.

Without a driver torch cannot ask the card what it supports, so on fake CUDA it falls back to
the math kernel, which holds the NxN attention matrix that a T4 or an A100 never materialises.
Inside the rehearsal and the planner on CUDA's rules, `F.scaled_dot_product_attention` calls
the kernel the card would pick instead (STAND_INS: 'attention kernel'), in PyTorch's order
(flash, then memory-efficient, then math) and by the main conditions it checks
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp):
- flash: compute capability 8.0 or newer, fp16 or bf16, head dim a multiple of 8 up to 256,
  no attention mask;
- memory-efficient: 5.0 or newer, fp32 or fp16 (bf16 from 8.0), head dim a multiple of 8
  (4 in fp32);
- math otherwise (and for grouped-query attention).
Both fused kernels have fake (shape-only) implementations and derivatives in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


def kernel_for(capability: tuple[int, int], query: torch.Tensor, attn_mask, enable_gqa: bool) -> str:
    """'flash', 'efficient' or 'math': what PyTorch picks on a card of `capability` (see above)."""
    head_dim, dtype = query.shape[-1], query.dtype
    if query.dim() != 4 or enable_gqa:
        return "math"
    if capability >= (8, 0) and dtype in HALF and head_dim % 8 == 0 and head_dim <= 256 and attn_mask is None:
        return "flash"
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if capability >= (8, 0) else ())
    if capability >= (5, 0) and dtype in dtypes and head_dim % (8 if dtype in HALF else 4) == 0:
        return "efficient"
    return "math"


def attention_on(capability: tuple[int, int], used: set):
    """A stand-in for F.scaled_dot_product_attention on a card of `capability`; adds
    'attention kernel' to `used` when a fused kernel replaces the math one."""
    math_kernel = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        on_cuda = query.device.type == "cuda"
        if on_cuda and torch.is_autocast_enabled("cuda"):  # autocast casts attention's inputs, as for the real op
            dtype = torch.get_autocast_dtype("cuda")
            query, key, value = (t.to(dtype) for t in (query, key, value))
        kernel = kernel_for(capability, query, attn_mask, enable_gqa) if on_cuda else "math"
        if kernel == "math":
            return math_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        used.add("attention kernel")
        with torch.autocast("cuda", enabled=False):
            if kernel == "flash":  # (out BxHxNxD, logsumexp BxHxN, ...)
                return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                scale=scale)[0]
            return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, query.requires_grad,
                                                                dropout_p, is_causal, scale=scale)[0]
    return attention

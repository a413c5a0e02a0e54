"""Counter-based random numbers: every draw of a sample is a hash of its own seed.

    u = uniforms(seeds, view=1, count=35)  # float64 (N, 35) in [0, 1)

Draw j of view v of sample i is splitmix64 of (seeds[i], v, j) and of nothing else, so a
sample's views do not depend on the batch it is in, on its position there, on the batch
size or on the device: the arithmetic is 64-bit integer, which wraps identically on CPU
and CUDA, and the final conversion to float64 is exact.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_STREAM = 1 << 16  # counters per view: views never share a counter


def _as_int64(constant: int) -> int:
    """A 64-bit constant as the signed value with the same bits (torch has no uint64 arithmetic)."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping multiplication)."""
    x = (x ^ _shift_right(x, 30)) * _as_int64(_MIX[0])
    x = (x ^ _shift_right(x, 27)) * _as_int64(_MIX[1])
    return x ^ _shift_right(x, 31)


def uniforms(seeds: torch.Tensor, view: int, count: int) -> torch.Tensor:
    """(N, count) float64 in [0, 1): draws 0..count-1 of view `view` of each sample's seed."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    key = splitmix64(seeds)  # (N,) decorrelates neighbouring seeds
    counter = torch.arange(count, device=seeds.device, dtype=torch.int64) + (view * _STREAM + 1)  # (count,)
    bits = splitmix64(key[:, None] + counter[None, :] * _as_int64(_GOLDEN))  # (N, count)
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53  # the top 53 bits: exact in float64

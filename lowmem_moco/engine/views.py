"""The step's input: one view (query or key) of this process's share of the effective batch.

A view is either

- a tensor (n, 3, H, W) on the training device, made whole before the step (the official
  code's way; tests, benchmarks and the planner's "whole batch" mode use it), or
- a `LazyView`: `len(view)` samples whose images are made on demand, `view(rows)` ->
  (r, 3, H, W) on the training device. The pipeline hands these over (data/lazy_views.py), so
  the step makes key views one key chunk at a time and query views one micro-batch at a
  time, and frees each after use: input memory follows the micro-batch, not B.

Both give the same values for the same rows: each sample's view is a function of its own
seed, never of the other rows it is made with.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch


class LazyView(Protocol):
    def __len__(self) -> int: ...

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(r, 3, H, W) on the training device, for rows (r,) int64 in [0, len)."""
        ...


View = Union[torch.Tensor, LazyView]


def same_layout(selected: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Indexing returns a contiguous tensor: keep channels_last inputs channels_last."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return selected.contiguous(memory_format=torch.channels_last)
    return selected


def take(view: View, rows: torch.Tensor | slice) -> torch.Tensor:
    """Samples `rows` of a view: (r, 3, H, W) on the training device."""
    if torch.is_tensor(view):
        return view[rows] if isinstance(rows, slice) else same_layout(view[rows.to(view.device)], view)
    if isinstance(rows, slice):
        rows = torch.arange(len(view))[rows]
    return view(rows)


def whole(view: View) -> torch.Tensor:
    """All samples of a view, made now: (n, 3, H, W)."""
    return view if torch.is_tensor(view) else view(torch.arange(len(view)))

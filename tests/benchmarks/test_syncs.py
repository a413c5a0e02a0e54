"""benchmarks/harness/syncs.py: the host-device syncs of one step, from PyTorch's sync debug mode's
warnings; on a CPU the counting and attribution, fed warnings of the same text."""

from __future__ import annotations

import inspect
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import lowmem_moco
from benchmarks.harness import syncs
from lowmem_moco.engine.step import optimizer_step

TORCH = Path(torch.__file__).resolve().parent
STEP_PY = Path(lowmem_moco.__file__).resolve().parent / "engine" / "step.py"
# As PyTorch words it: TORCH_WARN's text with the C++ location appended
WARNED = f"{syncs.SYNC_MESSAGE} (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:139.)"


def _line_of(function, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    [k] = [k for k, line in enumerate(lines) if text in line]
    return first + k


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_without_a_gpu_the_count_is_not_measured_and_the_step_not_run(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def step():
        raise AssertionError("the step ran")

    assert syncs.count_syncs(step, torch.device(device)) == {"count": None, "reason": "no GPU", "sites": []}


def test_only_sync_warnings_count_each_at_our_line_that_made_it():
    grad_scaler = str(TORCH / "amp" / "grad_scaler.py")
    # the stack of a sync made inside torch: our harness, our step's optimizer.step() line, then torch
    stack = [traceback.FrameSummary(str(Path(syncs.__file__).parent / "cells.py"), 150, "<lambda>"),
             traceback.FrameSummary(str(STEP_PY), 118, "optimizer_step"),
             traceback.FrameSummary(grad_scaler, 380, "_maybe_opt_step")]
    messages = [warnings.WarningMessage(WARNED, UserWarning, str(STEP_PY), 115),  # in our code: its own line
                warnings.WarningMessage("something else", UserWarning, str(STEP_PY), 90),
                warnings.WarningMessage(WARNED, UserWarning, grad_scaler, 380),
                warnings.WarningMessage("deprecated", DeprecationWarning, grad_scaler, 12),
                warnings.WarningMessage(WARNED, UserWarning, grad_scaler, 380),
                warnings.WarningMessage(WARNED, UserWarning, grad_scaler, 390)]  # no stack: where it warned
    result = syncs.summarise(messages, [None, None, stack, None, stack])
    assert result == {"count": 4, "reason": None, "sites": [
        {"site": "lowmem_moco/engine/step.py:115", "warned_at": "lowmem_moco/engine/step.py:115", "count": 1},
        {"site": "lowmem_moco/engine/step.py:118", "warned_at": "torch/amp/grad_scaler.py:380", "count": 2},
        {"site": "torch/amp/grad_scaler.py:390", "warned_at": "torch/amp/grad_scaler.py:390", "count": 1}]}
    assert syncs.summarise(messages[1:2] + messages[3:4]) == {"count": 0, "reason": None, "sites": []}


def test_a_warning_raised_inside_torch_is_put_on_our_line_that_called_it():
    class WarnsOnStep(torch.optim.SGD):
        def step(self, closure=None):  # one level below torch's step wrapper: the warning is placed there
            warnings.warn(WARNED, stacklevel=2)

    shown = warnings.showwarning
    with syncs.capture() as (messages, stacks):
        optimizer_step(WarnsOnStep([torch.nn.Parameter(torch.ones(2))], lr=0.1), torch.tensor(1.0), planning=False)
        optimizer_step(WarnsOnStep([torch.nn.Parameter(torch.ones(2))], lr=0.1), torch.tensor(2.0), planning=False)
    assert warnings.showwarning is shown  # the hook ends with the capture
    assert Path(messages[0].filename).resolve().is_relative_to(TORCH)
    result = syncs.summarise(messages, stacks)
    assert result["count"] == 2
    [site] = result["sites"]
    assert site["site"] == f"lowmem_moco/engine/step.py:{_line_of(optimizer_step, 'optimizer.step()')}"
    assert site["warned_at"].startswith("torch/optim/optimizer.py:") and site["count"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sync_debug_mode_counts_a_host_read_and_is_reset_after_a_failed_step():
    x = torch.ones(1024, device="cuda")  # 1024
    result = syncs.count_syncs(lambda: x.sum().item(), torch.device("cuda"))
    assert result["count"] == 1 and result["sites"][0]["count"] == 1
    assert syncs.count_syncs(lambda: x.mul_(2), torch.device("cuda"))["count"] == 0  # queued, no wait

    def fails():
        x.sum().item()
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        syncs.count_syncs(fails, torch.device("cuda"))
    assert torch.cuda.get_sync_debug_mode() == 0

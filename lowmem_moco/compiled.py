"""train.compile: the query and key backbones through torch.compile, eager when compiling fails.

Each backbone keeps its parameters, buffers and state_dict keys: only its `forward` is
replaced, by a `GuardedForward` that calls the compiled forward and, the first time compiling
fails, warns once and runs the module's own forward instead, for that call and every later one.
Checkpoints, resume, export and the momentum update (which walks f_q's and f_k's parameters)
cannot tell a compiled run from an eager one.

Why a failed call can be re-run eagerly: torch.compile compiles at a call, before running
anything, so a compile error leaves BatchNorm running statistics and every other state as they
were. The backward graph is normally compiled later, at the first backward; it is compiled
with the forward here (torch._functorch's `force_non_lazy_backward_lowering`, where this torch
has it), so that its failures also surface before the forward has run.

A step compiles two graphs, once: f_q's at the micro-batch (forward and backward) and f_k's
at the key chunk (forward, no autograd). Marking the batch dimension dynamic would not merge
them, since one records autograd and the other does not. Modules in eval mode (the kNN
monitor) run eagerly, so that its batch sizes add no compiles.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

BACKEND = "inductor"  # torch.compile's backend; tests use "aot_eager" (no C++ code generation)
SILENCE = "set train.compile=false to train eagerly without trying"


class CompileFallback:
    """What the guarded forwards of one model share: once one fails, all run eagerly (one warning)."""

    def __init__(self):
        self.reason: str | None = None  # why compiling failed; None while it works

    def fail(self, err: BaseException) -> None:
        if self.reason is not None:
            return
        # dynamo wraps the backend's own error (BackendCompilerFailed): name that one
        while getattr(err, "inner_exception", None) is not None or err.__cause__ is not None:
            err = getattr(err, "inner_exception", None) or err.__cause__
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        self.reason = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
        warnings.warn(f"train.compile: compiling failed ({self.reason}); training continues eagerly ({SILENCE})",
                      stacklevel=3)


class GuardedForward:
    """Stands in for `module.forward`: the compiled forward while compiling works, else the eager one."""

    def __init__(self, module: nn.Module, fallback: CompileFallback, backend: str):
        self.eager = type(module).forward.__get__(module)  # the module's own forward, bound to it
        self.fallback, self.backend = fallback, backend
        self.compiled = None
        try:  # torch.compile itself refuses some set-ups at once (an old torch, an unsupported Python)
            self.compiled = torch.compile(self.eager, backend=backend)
        except Exception as err:  # noqa: BLE001 - any refusal means: train eagerly
            fallback.fail(err)

    def __call__(self, *args, **kwargs):
        # Evaluation (the kNN monitor, module.eval()) runs eagerly: its batch sizes would each
        # compile once more, for a pass made once an epoch.
        if self.compiled is not None and self.fallback.reason is None and self.eager.__self__.training:
            try:
                with _backward_compiled_with_forward():
                    return self.compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise  # not a compile problem: the trainer names the micro-batch to lower
            except Exception as err:  # noqa: BLE001 - compiling failed before anything ran
                self.fallback.fail(err)
        return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo):
        # A copied module (e.g. f_k made from f_q) gets its own compiled forward, bound to the copy.
        return GuardedForward(copy.deepcopy(self.eager.__self__, memo), self.fallback, self.backend)


def _backward_compiled_with_forward():
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


def compile_module(module: nn.Module, fallback: CompileFallback, backend: str | None = None) -> None:
    """Compile `module`'s forward in place (keys, parameters and hooks unchanged)."""
    module.forward = GuardedForward(module, fallback, backend or BACKEND)


def compile_encoders(moco: nn.Module, backend: str | None = None) -> CompileFallback:
    """train.compile=true: compile f_q's and f_k's backbones in place. The heads (two Linear
    layers) stay eager: there is little to fuse in them."""
    fallback = CompileFallback()
    for encoder in (moco.encoder_q, moco.encoder_k):
        compile_module(encoder.backbone, fallback, backend)
    return fallback


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), GuardedForward)

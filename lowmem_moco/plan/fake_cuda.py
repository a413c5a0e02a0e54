"""Fake CUDA: the trainer's CUDA path run on a machine without a GPU, and what it asks of the host.

    with FakeCuda(capability=(7, 5)) as cuda:
        cuda.to_device(moco)                 # parameters and buffers: fake tensors on cuda
        cuda.watch.start_step()
        step(...)                            # every CUDA operator runs on shapes only
    cuda.watch.steps[-1].syncs               # ["lowmem_moco/engine/step.py:102", ...]

Tensors on "cuda" are torch's fake tensors (FakeTensorMode): a CUDA tensor meeting a CPU
tensor raises as it would on a GPU, and `torch.autocast("cuda")` casts by CUDA's tables.
Host tensors stay real: an operator with no fake input and no CUDA device runs for real, so
the host's random numbers, crop boxes and indices are the values training computes.

`DeviceWatch` sees every operator and counts the ones that make the host wait for the GPU
(`SYNC_REASONS`), attributed to the innermost frame in lowmem_moco/. What only a GPU can
answer goes through named stand-ins (`STAND_INS`, with why each is safe); a CUDA call that
has none fails the rehearsal with the file:line that made it.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from .attention_kernels import attention_on
from .host_autograd import HostAutograd

aten = torch.ops.aten
PACKAGE = Path(__file__).resolve().parents[1]  # lowmem_moco/
REHEARSAL_FILES = {str(PACKAGE / "plan" / name) for name in ("fake_cuda.py", "rehearse.py", "one_process.py",
                                                                    "host_autograd.py", "attention_kernels.py")}

STAND_INS = {
    "pinned host memory": "a pinned allocation is an ordinary host allocation marked as pinned; pinning changes "
                          "when a copy may overlap, not what is copied",
    "values read from the GPU": "a value the host reads from a fake tensor (.item(), float(), a copy to the host) "
                                "is 0, or True for a bool: the loss is finite and no gradient overflowed, the "
                                "branch training takes; each read is still counted as a sync",
    "data-dependent shapes": "nonzero, masked_select, unique and repeat_interleave on the GPU answer with a shape "
                             "(every element selected, one unique value); only reached by code that also syncs "
                             "there, which the rehearsal reports",
    "autograd engine": "torch's C++ autograd engine asks the CUDA driver which devices hold a context "
                       "before it schedules CUDA work: backward() walks the same graph node by node on the "
                       "calling thread instead (plan/host_autograd.py): the engine's order, checks, hooks and "
                       "freeing of saved tensors, every backward operator run on fake CUDA; held to torch's "
                       "engine on CPU tensors (same gradients bit for bit, same peak). Not seen: the engine's "
                       "device thread and its stream synchronisation",
    "attention kernel": "without a driver torch runs scaled_dot_product_attention's math kernel, which holds "
                        "the NxN attention matrix; the kernel the card would pick runs instead (flash from "
                        "compute capability 8.0, memory-efficient from 5.0, by PyTorch's order and main "
                        "conditions, plan/attention_kernels.py); a choice PyTorch makes otherwise (an input "
                        "layout it refuses) is not seen",
    "CUDA random state": "torch.cuda.get_rng_state / set_rng_state (the v3 gradient cache saves the GPU's "
                         "random state per micro-batch and replays it) need a driver: the state read is a fixed "
                         "one and a restore does nothing; the replay itself is checked on the CPU "
                         "(tests/engine/test_gradcache.py)",
    "CUDA autocast availability": "torch.autocast('cuda') and GradScaler('cuda') check for a CUDA driver before "
                                  "they enable themselves; the check answers yes, and bf16 support follows the "
                                  "card's compute capability, so the casts are CUDA's own tables",
}

# Operators that make the host wait for the GPU, by why. Copies are decided by their devices.
SYNC_REASONS = {
    aten._local_scalar_dense.default: "a value read on the host (.item(), float(), int(), bool())",
    aten.nonzero.default: "nonzero (its output size is on the GPU)",
    aten.masked_select.default: "masked_select (its output size is on the GPU)",
    aten._unique2.default: "unique (its output size is on the GPU)",
    aten.unique_dim.default: "unique (its output size is on the GPU)",
    aten.unique_consecutive.default: "unique_consecutive (its output size is on the GPU)",
    aten.is_nonzero.default: "a tensor's truth value on the host",
    aten.equal.default: "torch.equal (its answer is read on the host)",
}


class RehearsalError(RuntimeError):
    """The CUDA path cannot run as written: the message names the file:line."""


def site_of(frames) -> str:
    """'lowmem_moco/x.py:N' of the innermost frame inside the package (not the rehearsal's own), else '?'."""
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(PACKAGE) and str(path) not in REHEARSAL_FILES:
            return f"{path.relative_to(PACKAGE.parent)}:{frame.lineno}"
    return "?"


def _on_cuda(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _copy_sync(func, args, kwargs) -> str | None:
    """Why a copy makes the host wait: to the host always; to the GPU unless non_blocking (PyTorch
    then synchronises the stream after the copy)."""
    if func is aten._to_copy.default:
        src, dst_device, non_blocking = args[0], kwargs.get("device"), kwargs.get("non_blocking", False)
    elif func is aten.copy_.default:
        dst, src = args[0], args[1]
        dst_device, non_blocking = dst.device, (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return None
    if dst_device is None or not isinstance(src, torch.Tensor):
        return None
    dst_type = torch.device(dst_device).type
    if src.device.type == "cuda" and dst_type == "cpu":
        return "a copy from the GPU to the host"
    if src.device.type == "cpu" and dst_type == "cuda" and not non_blocking and src.dim() > 0:
        return "a blocking copy to the GPU (non_blocking=False synchronises the stream)"
    return None


@dataclass
class StepRecord:
    syncs: list = field(default_factory=list)  # (site, reason) in order
    cuda_ops: int = 0


class DeviceWatch(TorchDispatchMode):
    """Counts CUDA operators and syncs per step; answers, through stand-ins, what only a GPU could."""

    def __init__(self):
        super().__init__()
        self.steps: list[StepRecord] = []
        self.stand_ins_used: set[str] = set()
        self._pinned = weakref.WeakSet()  # host storages a stand-in pinned

    def start_step(self) -> None:
        self.steps.append(StepRecord())

    def _pin(self, tensor: torch.Tensor) -> torch.Tensor:
        self.stand_ins_used.add("pinned host memory")
        self._pinned.add(tensor.untyped_storage())
        return tensor

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        on_cuda = any(_on_cuda(t) for t in tensors) or (device is not None and torch.device(device).type == "cuda")
        if not on_cuda and not any(isinstance(t, FakeTensor) for t in tensors):
            return self._host(func, args, kwargs)
        reason = SYNC_REASONS.get(func) if any(_on_cuda(t) for t in tensors) else None
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            reason = "repeat_interleave without output_size (its output size is on the GPU)"
        reason = reason or _copy_sync(func, args, kwargs)
        if reason and self.steps:
            self.steps[-1].syncs.append((site_of(traceback.extract_stack()), reason))
        if self.steps and func.namespace == "aten" and not func.is_view:
            self.steps[-1].cuda_ops += 1
        if reason:
            answered = self._answer(func, args, kwargs)
            if answered is not NotImplemented:
                return answered
        return func(*args, **kwargs)

    def _host(self, func, args, kwargs):
        """A host operator, run for real (modes off): its values are the ones training computes."""
        if func is aten.is_pinned.default:
            return args[0].untyped_storage() in self._pinned
        if func is aten._pin_memory.default:
            with _disable_current_modes():
                return self._pin(args[0].clone())
        if kwargs.get("pin_memory"):
            with _disable_current_modes():
                return self._pin(func(*args, **dict(kwargs, pin_memory=False)))
        with _disable_current_modes():
            return func(*args, **kwargs)

    def _answer(self, func, args, kwargs):
        """What a GPU would answer to a sync, from shapes alone (STAND_INS); NotImplemented: run it."""
        self.stand_ins_used.add("values read from the GPU")
        x = args[0]
        if func is aten._local_scalar_dense.default or func is aten.is_nonzero.default:
            return True if x.dtype == torch.bool else (0.0 if x.dtype.is_floating_point else 0)
        if func is aten.equal.default:
            return True
        if _copy_sync(func, args, kwargs) == "a copy from the GPU to the host":
            with _disable_current_modes():
                values = torch.ones if x.dtype == torch.bool else torch.zeros
                return values(x.shape, dtype=kwargs.get("dtype") or x.dtype)
        if func in (aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                    aten.repeat_interleave.Tensor):
            self.stand_ins_used.add("data-dependent shapes")
            n = x.numel()
            if func is aten.nonzero.default:
                return torch.empty(n, x.dim(), dtype=torch.long, device=x.device)
            if func is aten.masked_select.default:
                return torch.empty(torch.broadcast_shapes(x.shape, args[1].shape).numel(), dtype=x.dtype,
                                   device=x.device)
            if func is aten.repeat_interleave.Tensor:  # every repeat 1
                return torch.arange(n, device=x.device)
            return (torch.empty(1, dtype=x.dtype, device=x.device), torch.zeros(x.shape, dtype=torch.long,
                    device=x.device), torch.ones(1, dtype=torch.long, device=x.device))
        return NotImplemented


def _patched_for_cuda(capability: tuple[int, int], used: set):
    """CUDA autocast and GradScaler enabled without a driver (STAND_INS: 'CUDA autocast availability'),
    the backward run node by node (STAND_INS: 'autograd engine') and the card's attention kernel
    (STAND_INS: 'attention kernel', listed in `used` when reached)."""
    stack = contextlib.ExitStack()
    stack.enter_context(HostAutograd())
    stack.enter_context(mock.patch("torch.nn.functional.scaled_dot_product_attention",
                                   attention_on(capability, used)))
    stack.enter_context(mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False))
    stack.enter_context(mock.patch("torch.cuda.is_bf16_supported", return_value=capability >= (8, 0)))
    return stack


class FakeCuda:
    """FakeTensorMode on device cuda with a `DeviceWatch` on top; every patch lives and ends here."""

    def __init__(self, capability: tuple[int, int]):
        self.capability = capability
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.watch = DeviceWatch()
        self.device = torch.device("cuda", 0)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "FakeCuda":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_patched_for_cuda(self.capability, self.watch.stand_ins_used))
        fixed_state = torch.zeros(16, dtype=torch.uint8)  # made before the fake mode: a real host tensor

        def random_state(*args, **kwargs):  # STAND_INS: 'CUDA random state', listed only when reached
            self.watch.stand_ins_used.add("CUDA random state")
            return fixed_state
        self._stack.enter_context(mock.patch("torch.cuda.get_rng_state", random_state))
        self._stack.enter_context(mock.patch("torch.cuda.set_rng_state", lambda *args, **kwargs: None))
        self._stack.enter_context(self.mode)
        self._stack.enter_context(self.watch)
        self.watch.stand_ins_used.update({"CUDA autocast availability", "autograd engine"})
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def to_device(self, module: nn.Module) -> None:
        to_fake(module, self.mode, self.device)


def to_fake(module: nn.Module, mode: FakeTensorMode, device: torch.device | None = None) -> None:
    """Swap parameters and buffers for fake tensors of the same shape, dtype and layout.

    device=None (the planner on the CPU's rules): 0-dim buffers (the queue pointer, BatchNorm's
    batch counters) stay real, since the step reads their values and they hold a few bytes.
    On `device` (a fake GPU) every tensor moves, as `module.to(device)` would move it."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                fake = mode.from_tensor(p)
                m._parameters[name] = fake if device is None else nn.Parameter(
                    _moved(fake, device, mode), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and (device is not None or b.dim() > 0):
                fake = mode.from_tensor(b)
                m._buffers[name] = fake if device is None else _moved(fake, device, mode)


def _moved(fake: torch.Tensor, device: torch.device, mode: FakeTensorMode) -> torch.Tensor:
    with mode:  # strides kept: channels_last parameters stay channels_last
        return fake.detach().to(device)

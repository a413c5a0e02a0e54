"""The node-by-node backward (plan/host_autograd.py) held to torch's own engine on CPU tensors:
the same gradients bit for bit, the same operators in the same order, the same peak; and the
engine's errors, hooks and callbacks."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_moco.config import load_config
from lowmem_moco.plan.fake_cuda import FakeCuda
from lowmem_moco.plan.host_autograd import HostAutograd
from lowmem_moco.plan.predict import PlannedStep

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class Scale(torch.autograd.Function):
    """A custom Function: its backward runs as Python, with a saved tensor."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum(0)


class Branchy(torch.nn.Module):
    """A residual merge, a parameter used twice, a hook that rewrites a gradient, a custom Function."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.w = torch.nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = self.a(x).relu()
        h.register_hook(lambda g: g * 2)  # a non-leaf tensor's hook replaces its gradient
        h = h + self.b(h) + self.a(h)
        return Scale.apply(h, self.w).tanh()


def _models():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=5, channels=[8, 16, 32, 64])
    resnet.set_grad_checkpointing(True)  # non-reentrant checkpointing: recomputation inside the backward
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    return [(resnet, torch.randn(4, 3, 32, 32)), (vit, torch.randn(4, 3, 32, 32)), (Branchy(), torch.randn(4, 6))]


class Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        if func is not torch.ops.aten.detach.default:  # saved tensors come back through hooks as aliases
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("index", range(3), ids=["resnet18-checkpointed", "vit", "hooks-and-function"])
def test_the_same_gradients_and_operators_as_torchs_engine(index):
    model, x = _models()[index]
    twin = copy.deepcopy(model)
    torch_ops, host_ops = Operators(), Operators()
    loss = model(x).logsumexp(-1).mean()
    with torch_ops:
        loss.backward()
    with HostAutograd():
        twin_loss = twin(x).logsumexp(-1).mean()
        with host_ops:
            twin_loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert host_ops.names == torch_ops.names  # the engine's order: same operators, same sequence


def test_the_same_peak_as_torchs_engine_with_and_without_checkpointing():
    cfg = load_config(None, ["model.arch=resnet18", "model.timm_kwargs.channels=[8,16,32,64]",
                             "data.image_size=32", "train.batch_size=8", "moco.queue_size=64", "moco.key_chunks=2",
                             "data.source=synthetic"])
    for checkpointing in (False, True):
        step = PlannedStep(cfg, "bf16", checkpointing)
        engine = step.predict(4)
        with HostAutograd():
            host = step.predict(4)
        assert host.peak_bytes == engine.peak_bytes and host.by_category == engine.by_category, checkpointing


def test_hooks_callbacks_and_the_graph_task_id_answer_as_inside_the_engine():
    x = torch.randn(3, requires_grad=True)
    seen = []
    with HostAutograd():
        assert torch._C._current_graph_task_id() == -1
        a, b = x.exp(), x.sin()
        register_multi_grad_hook((a, b), lambda grads: seen.append(("all", len(grads))))  # mode "all"

        def hook(grad):
            seen.append(("task", torch._C._current_graph_task_id() != -1))
            torch.autograd.Variable._execution_engine.queue_callback(lambda: seen.append(("callback",)))
        b.register_hook(hook)
        (a + b).sum().backward()
        with pytest.raises(RuntimeError, match="during backward"):
            torch.autograd.Variable._execution_engine.queue_callback(lambda: None)
    assert seen == [("task", True), ("all", 2), ("callback",)]
    assert torch.allclose(x.grad, x.exp() + x.cos())


def test_a_second_backward_and_a_gradient_on_the_wrong_device_fail_as_in_the_engine():
    x = torch.randn(3, requires_grad=True)
    with HostAutograd():
        y = (x.exp() * 2).sum()
        y.backward()
        with pytest.raises(RuntimeError, match="second time"):
            y.backward()
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.ones(2).sum().backward()

    class OnTheHost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.ones(grad.shape)  # a CPU gradient for a CUDA input

    with FakeCuda((7, 5)):
        v = torch.empty(4, device="cuda", requires_grad=True)
        with pytest.raises(RuntimeError, match="expected device cuda:0 but got cpu"):
            OnTheHost.apply(v).sum().backward()

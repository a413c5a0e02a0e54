"""The backward pass of fake CUDA tensors, run node by node on the calling thread.

    with HostAutograd() as autograd:   # forward and backward inside: saved tensors are tracked
        loss = model(x).sum()          # x: a fake CUDA tensor
        loss.backward()                # every backward operator runs, on fake CUDA

torch's C++ autograd engine cannot take a fake CUDA tensor on a machine without a driver: before
it schedules CUDA work it asks the driver which devices hold a context, and fails. The graph
itself is fine: every node (`grad_fn`) can be called from Python. `HostAutograd` patches
`torch.autograd.backward` (hence `Tensor.backward`) to walk the graph as the engine does:
- the same order: a node runs once every gradient it waits for has arrived, the ready node with
  the highest sequence number first (the engine's ready queue), AccumulateGrad before the rest;
- the same checks on each node's outputs (the engine's validate_outputs): a gradient is summed
  to its input's shape, cast to its dtype, and must be on its device (a 0-dim one is moved);
- the same hooks: tensor hooks (`register_hook`, e.g. MemTracker's) before the node that
  receives the gradient; `torch._C._current_graph_task_id()` answers inside a backward, which
  non-reentrant checkpointing and ModTracker read;
- the same memory: a node's saved tensors are freed right after it runs (retain_graph=False),
  through saved-tensor hooks installed for the forward, as the engine's release_variables does.

Not replayed: node-level hooks (`Node.register_hook`/`register_prehook`; the step registers
none), create_graph, `inputs=`, and custom Functions with non-tensor inputs (each raises).
tests/plan/test_host_autograd.py holds it to torch's engine on CPU tensors: the same gradients,
bit for bit, and the same MemTracker peak.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from unittest import mock

import torch
from torch.autograd.function import BackwardCFunction
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.autograd.graph import get_gradient_edge, saved_tensors_hooks

_task_ids = itertools.count(1)


class _Saved:
    """A tensor a node saved for its backward; emptied once the node has run."""
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class HostAutograd:
    """Patches torch.autograd.backward, Tensor.register_hook and the graph task id while open."""

    def __init__(self):
        self._stack: contextlib.ExitStack | None = None
        self._task_id = -1  # the engine's answer outside a backward
        self._unpacked: list[_Saved] = []  # saved tensors the running node read
        self._saved: list[_Saved] = []  # every holder, emptied on exit (a graph never backwarded)
        # node -> {input_nr: the tensor's hook dict}, for hooks on non-leaf tensors (nodes take no weak
        # references: an entry lives until its node runs, or until exit for a graph never backwarded)
        self._hooks: dict = {}
        self._callbacks: list | None = None  # queue_callback's, run when the running backward ends
        self._nodes: set | None = None  # the nodes the running backward reaches

    def __enter__(self) -> "HostAutograd":
        real_register_hook = torch.Tensor.register_hook

        def register_hook(tensor, hook):
            handle = real_register_hook(tensor, hook)
            if tensor.grad_fn is not None:  # a leaf's hooks live on the leaf (tensor._backward_hooks)
                self._hooks.setdefault(tensor.grad_fn, {})[tensor.output_nr] = tensor._backward_hooks
            return handle

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(mock.patch("torch.autograd.backward", self.backward))
        self._stack.enter_context(mock.patch.object(torch.Tensor, "register_hook", register_hook))
        self._stack.enter_context(mock.patch.object(torch._C, "_current_graph_task_id", lambda: self._task_id))
        self._stack.enter_context(mock.patch.object(torch._C, "_will_engine_execute_node", self._will_execute))
        self._stack.enter_context(mock.patch.object(torch.autograd.Variable, "_execution_engine",
                                                    _Engine(torch.autograd.Variable._execution_engine, self)))
        self._stack.enter_context(saved_tensors_hooks(self._pack, self._unpack))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        for holder in self._saved:
            holder.tensor = None
        self._saved, self._hooks = [], {}

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        holder = _Saved(tensor)
        self._saved.append(holder)
        return holder

    def _unpack(self, holder: _Saved) -> torch.Tensor:
        if holder.tensor is None:
            raise RuntimeError("Trying to backward through the graph a second time: its saved tensors were "
                               "freed after the first backward (pass retain_graph=True the first time)")
        self._unpacked.append(holder)
        return holder.tensor

    def backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                 inputs=None) -> None:
        """torch.autograd.backward, node by node (see the module docstring)."""
        if create_graph or inputs is not None:
            raise NotImplementedError("the backward on fake CUDA replays plain backward() calls only, "
                                      "not create_graph=True or inputs=")
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        grads = grad_tensors if grad_tensors is not None else grad_variables
        grads = [grads] if grads is None or isinstance(grads, torch.Tensor) else list(grads)
        grads = grads * len(tensors) if len(grads) == 1 and len(tensors) > 1 and grads[0] is None else grads
        roots = [(t, _root_grad(t, g)) for t, g in zip(tensors, grads, strict=True)]
        outer = self._task_id, self._callbacks, self._nodes
        self._task_id, self._callbacks = next(_task_ids), []
        try:
            self._run(roots, retain=create_graph if retain_graph is None else retain_graph)
            for callback in self._callbacks:  # the engine's final callbacks; one may queue another
                callback()
        finally:
            self._task_id, self._callbacks, self._nodes = outer

    def _will_execute(self, node) -> bool:
        if self._nodes is None:
            raise RuntimeError("_will_engine_execute_node should only be called during the backward pass")
        return node in self._nodes

    def queue_callback(self, callback) -> None:
        if self._callbacks is None:
            raise RuntimeError("Final callbacks can only be installed during backward pass.")
        self._callbacks.append(callback)

    def _run(self, roots, retain: bool) -> None:
        buffers: dict = {}  # node -> [gradient per input], summed as they arrive
        for tensor, grad in roots:
            edge = get_gradient_edge(tensor)
            _accumulate(buffers, edge.node, edge.output_nr, grad)
        given = {id(grad) for _, grad in roots}  # the caller holds these too: never stolen
        waiting, self._nodes = _dependencies(list(buffers))
        order = itertools.count()  # ties (equal sequence numbers) go first in, first out
        ready = [(-node._sequence_nr(), next(order), node) for node in buffers if not waiting.get(node)]
        heapq.heapify(ready)
        while ready:
            node = heapq.heappop(ready)[2]
            inputs = buffers.pop(node)
            # The engine's AccumulateGrad steals a gradient nothing else holds; a call from Python
            # always holds one more reference, so it is done here, as the engine would.
            shared = hasattr(node, "variable") and _held_elsewhere(inputs[0], buffers, given)
            outputs = self._call(node, inputs, retain, shared)
            for i, (next_node, input_nr) in enumerate(node.next_functions):
                if next_node is None:
                    continue
                if i < len(outputs) and outputs[i] is not None:
                    _accumulate(buffers, next_node, input_nr, _validated(outputs[i], next_node, input_nr, i, node))
                waiting[next_node] -= 1
                if waiting[next_node] == 0:
                    buffers.setdefault(next_node, [None] * len(next_node._input_metadata))
                    heapq.heappush(ready, (-next_node._sequence_nr(), next(order), next_node))

    def _call(self, node, inputs: list, retain: bool, shared: bool) -> tuple:
        """One node, as the engine calls it: its tensor hooks, then the node without grad mode,
        then (retain_graph=False) its saved tensors freed."""
        leaf = getattr(node, "variable", None)  # AccumulateGrad: the leaf's own hooks
        hooks = {0: leaf._backward_hooks} if leaf is not None else self._hooks.get(node, {})
        for input_nr, hook_dict in hooks.items():
            for hook in list((hook_dict or {}).values()):
                if inputs[input_nr] is not None:
                    replaced = hook(inputs[input_nr])
                    inputs[input_nr] = inputs[input_nr] if replaced is None else replaced
        self._unpacked, outer_unpacked = [], self._unpacked
        try:
            with torch.no_grad():
                if leaf is not None:
                    _accumulate_grad(leaf, inputs[0], steal=not shared)
                    return ()
                return _apply(node, inputs)
        finally:
            if not retain:
                for holder in self._unpacked:
                    holder.tensor = None
                self._hooks.pop(node, None)
            self._unpacked = outer_unpacked


class _Engine:
    """torch's engine object, with `queue_callback` answered by the running HostAutograd."""

    def __init__(self, engine, autograd: HostAutograd):
        self._engine, self.queue_callback = engine, autograd.queue_callback

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _root_grad(tensor: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if not tensor.requires_grad:
        raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    if grad is None:
        if tensor.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        return torch.ones_like(tensor, memory_format=torch.preserve_format)
    return grad


def _dependencies(roots: list) -> tuple[dict, set]:
    """(how many gradients each node waits for: its incoming edges from nodes this backward runs;
    the nodes it runs)."""
    waiting, seen, todo = {}, set(roots), list(roots)
    while todo:
        for next_node, _ in todo.pop().next_functions:
            if next_node is None:
                continue
            waiting[next_node] = waiting.get(next_node, 0) + 1
            if next_node not in seen:
                seen.add(next_node)
                todo.append(next_node)
    return waiting, seen


def _accumulate(buffers: dict, node, input_nr: int, grad: torch.Tensor) -> None:
    """Out of place, as torch's engine sums gradients of fake tensors (a tensor subclass)."""
    slots = buffers.setdefault(node, [None] * len(node._input_metadata))
    slots[input_nr] = grad if slots[input_nr] is None else slots[input_nr] + grad


def _held_elsewhere(grad: torch.Tensor | None, buffers: dict, given: set) -> bool:
    """Whether a leaf's gradient is also the caller's or waits in another node's inputs."""
    return grad is not None and (id(grad) in given or any(grad is g for slots in buffers.values() for g in slots))


def _accumulate_grad(leaf: torch.Tensor, grad: torch.Tensor | None, steal: bool) -> None:
    """AccumulateGrad: the first gradient becomes .grad (stolen when nothing else holds it and
    its layout is the parameter's, else copied into that layout); later ones are added in place;
    then the leaf's post-accumulate hooks."""
    if grad is None:
        return
    if leaf.grad is None:
        dense = is_non_overlapping_and_dense_or_false(leaf)
        if steal and (grad.stride() == leaf.stride() if dense else grad.is_contiguous()):
            leaf.grad = grad.detach()
        else:
            leaf.grad = (grad.new_empty_strided(leaf.shape, leaf.stride()).copy_(grad) if dense
                         else grad.clone(memory_format=torch.contiguous_format))
    else:
        leaf.grad += grad
    for hook in (leaf._post_accumulate_grad_hooks or {}).values():
        hook(leaf)


def _validated(grad: torch.Tensor, node, input_nr: int, index: int, producer) -> torch.Tensor:
    """The engine's validate_outputs: `grad` as the input it flows into expects it."""
    meta = node._input_metadata[input_nr]
    if grad.shape != meta.shape:
        try:
            grad = grad.sum_to_size(meta.shape)
        except RuntimeError:
            raise RuntimeError(f"Function {producer.name()} returned an invalid gradient at index {index} - got "
                               f"{list(grad.shape)} but expected shape compatible with {list(meta.shape)}") from None
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    if grad.device != meta.device:
        if grad.dim() != 0:
            raise RuntimeError(f"Function {producer.name()} returned an invalid gradient at index {index} - "
                               f"expected device {meta.device} but got {grad.device}")
        grad = grad.to(meta.device)
    return grad


def _apply(node, inputs: list) -> tuple:
    if isinstance(node, BackwardCFunction):  # a custom Function: its backward, None grads as zeros
        inputs = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                  for g, m in zip(inputs, node._input_metadata)]
        outputs = node.apply(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if len(outputs) != len(node.next_functions):
            raise NotImplementedError(f"{node.name()}: a custom Function with non-tensor inputs is not replayed "
                                      "on fake CUDA")
        return outputs
    outputs = node(*inputs)  # one output comes back bare, several as a tuple
    return outputs if isinstance(outputs, tuple) else (outputs,)

"""Peak tensor memory of one training step, by category, with torch's MemTracker.

    tracker = step_tracker(lean=True)
    tracker.track_external(moco, optimizer, view_q, view_k)  # or CountedAsInputs(lazy_view, tracker)
    with tracker:
        step(...)
    peak = peak_by_category(tracker, "cpu")  # {"params": bytes, ..., "total": bytes}

The same tracker counts real tensors (a measurement) and fake ones (the planner's prediction,
lowmem_moco/plan/predict.py): it sees storages being created and freed, not values.
"""

from __future__ import annotations

import weakref

from torch.distributed._tools.mem_tracker import MemTracker

# MemTracker's categories, under the names the reports use.
CATEGORIES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
              "Temp": "temporaries", "Optstate": "optimizer", "Other": "inputs"}


class StepTracker(MemTracker):
    """MemTracker, taught two things a MoCo step does (only its bookkeeping hooks change, not
    how tensors are counted):
    - run a frozen module (the key encoder): no gradient hook on parameters without grad;
    - call a top-level module more than once per step (micro-batches, key chunks): each call
      starts the module's own statistics afresh instead of raising."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        trainable = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    def _pre_fw_hook(self, module, inputs):
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)


class LeanStepTracker(StepTracker):
    """The step's peak and its categories only, without per-module statistics.

    MemTracker copies a snapshot at every module entry and exit and, after every operator,
    walks every module seen so far; with many micro-batches and key chunks that is most of
    the time. The category of each storage and the global peak are decided exactly as in
    MemTracker (the same dispatch, gradient and optimizer hooks), so the result is the same:
    tests/test_plan.py compares the two."""

    def _pre_fw_hook(self, module, inputs):
        if module not in self.memory_tracking:  # first call: parameters, buffers, gradient hooks
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
            self.memory_tracking[module] = None
        elif self._mod_tracker.is_bw and self._ac_mod is None:  # recomputation of a checkpointed region
            self._ac_mod, self._in_ac = weakref.ref(module), True

    def _post_fw_hook(self, module, inputs, outputs):
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class CountedAsInputs:
    """A lazy view (engine/views.py) whose views, made inside the step, the tracker counts as
    inputs rather than as activations."""

    def __init__(self, view, tracker: MemTracker):
        self.view, self.tracker = view, tracker

    def __len__(self) -> int:
        return len(self.view)

    def __call__(self, rows):
        images = self.view(rows)  # rx3xSxS
        self.tracker.track_external(images)
        return images


def step_tracker(lean: bool = False) -> StepTracker:
    return LeanStepTracker() if lean else StepTracker()


def peak_by_category(tracker: MemTracker, device_type: str) -> dict[str, int]:
    """Bytes by category at the step's peak on devices of `device_type`, plus 'total'."""
    snapshot = tracker.get_tracker_snapshot("peak")
    # Keys are devices as the tensors name them ("cuda:0"), so match on the type.
    peak = max((snap for dev, snap in snapshot.items() if dev.type == device_type),
               key=lambda snap: snap.get("Total", 0), default={})
    out = {CATEGORIES.get(getattr(k, "value", k), str(getattr(k, "value", k)).lower()): int(v)
           for k, v in peak.items()}
    out["total"] = out.pop("total", sum(out.values()))
    return out

"""The micro-batch x checkpointing search over planned steps, and its one-line failures.

    planner = Planner(cfg, precision="fp16")
    result = search(planner, budget_bytes=int(14.56 * 2**30))
    result.choice  # the fastest configuration predicted to fit, or None
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           UnsupportedOperatorException)

from ..config import Config
from ..errors import ConfigError
from .predict import CUDA_MARGIN, GiB, Gpu, PlannedStep, Prediction, usable_bytes

# What fake tensors refuse: an arch that needs one of these is measured on real CPU tensors.
UNTRACEABLE = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException,
               NotImplementedError)


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """Largest candidate for which fits() holds, assuming fits() is monotone (True then False)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def micro_batch_candidates(batch: int) -> list[int]:
    """Micro-batches the trainer accepts: divisors of the effective batch, at least 2."""
    return [m for m in range(2, batch + 1) if batch % m == 0]


def relative_speed(micro_batch: int, checkpointing: bool) -> float:
    """A rule, not a measurement, to rank configurations that fit: checkpointing re-runs the
    query forward (about +25 % of a step made of a key forward, a query forward and a backward
    twice as long); small micro-batches leave a GPU part idle (efficiency m / (m + 16)).
    `python -m benchmarks gpu` measures the real ratio."""
    return micro_batch / (micro_batch + 16) / (1.25 if checkpointing else 1.0)


class Planner:
    """Predictions for one config and precision, one built step per checkpointing setting,
    cached by (checkpointing, micro-batch). `card`: predicted on CUDA's rules for that card
    (fake CUDA tensors, CUDA autocast); None: on the CPU's. Falls back to real CPU tensors
    (with a warning) when the arch cannot run on fake tensors."""

    def __init__(self, cfg: Config, precision: str, card: Gpu | None = None):
        self.cfg, self.precision, self.card = cfg, precision, card
        self.steps: dict[bool, PlannedStep] = {}
        self.cache: dict[tuple[bool, int], Prediction] = {}
        self.fake = True

    def _step(self, checkpointing: bool) -> PlannedStep:
        if checkpointing not in self.steps:
            self.steps[checkpointing] = PlannedStep(self.cfg, self.precision, checkpointing, fake=self.fake,
                                                    card=self.card)
        return self.steps[checkpointing]

    def predict(self, checkpointing: bool, micro_batch: int) -> Prediction:
        key = (checkpointing, micro_batch)
        if key not in self.cache:
            try:
                self.cache[key] = self._step(checkpointing).predict(micro_batch)
            except UNTRACEABLE as err:
                if not self.fake:
                    raise
                warnings.warn(f"the planner cannot trace {self.cfg.model.arch} on fake tensors "
                              f"({type(err).__name__}); measuring real memory on the CPU instead (slower)",
                              stacklevel=2)
                self.fake, self.steps = False, {}
                self.cache[key] = self._step(checkpointing).predict(micro_batch)
        return self.cache[key]

    def fixed_bytes(self) -> int:
        """Parameters of both encoders, their buffers with the queue, and the optimizer state."""
        return sum(self._step(self.cfg.train.grad_checkpointing).fixed_bytes()[k]
                   for k in ("params", "buffers", "optimizer"))


@dataclass
class SearchResult:
    choice: Prediction | None
    tried: list  # every Prediction made, in order
    usable_bytes: int


def check_budget(planner: Planner, budget_bytes: int) -> None:
    """One line when the budget, less the margin, cannot hold even the model, the queue and the
    optimizer state."""
    fixed, cfg = planner.fixed_bytes(), planner.cfg
    if usable_bytes(budget_bytes) < fixed:
        minimum = (fixed + CUDA_MARGIN["fixed_gib"] * GiB) / (1 - CUDA_MARGIN["fraction"])
        raise ConfigError(f"a budget of {budget_bytes / GiB:.2f} GiB is below the {minimum / GiB:.2f} GiB minimum: the "
                          f"parameters of both encoders, the queue and the optimizer state take {fixed / GiB:.2f} GiB "
                          f"before any image, plus the margin ({CUDA_MARGIN['fraction']:.0%} + "
                          f"{CUDA_MARGIN['fixed_gib']} GiB); give at least {minimum / GiB:.2f} GiB, or lower "
                          f"moco.queue_size ({cfg.moco.queue_size}) or pick a smaller model.arch ({cfg.model.arch})")


def search(planner: Planner, budget_bytes: int, checkpointing: tuple = (False, True)) -> SearchResult:
    """Largest fitting micro-batch without checkpointing, then with it among larger
    micro-batches only (checkpointing at an equal or smaller micro-batch only costs time);
    the fastest of those by `relative_speed`. Each is a binary search from the top (memory
    grows with the micro-batch), so a roomy GPU costs one prediction per setting."""
    check_budget(planner, budget_bytes)
    limit = usable_bytes(budget_bytes)
    candidates = micro_batch_candidates(planner.cfg.train.batch_size)
    fitting = []
    for ckpt in checkpointing:
        def fits(m: int) -> bool:
            return planner.predict(ckpt, m).peak_bytes <= limit
        if fits(candidates[-1]):
            best = candidates[-1]
        else:
            best = largest_fitting(candidates[:-1], fits)
        if best is not None:
            fitting.append(planner.predict(ckpt, best))
            candidates = [m for m in candidates if m > best]
        if not candidates:
            break
    choice = max(fitting, key=lambda p: relative_speed(p.micro_batch, p.checkpointing), default=None)
    return SearchResult(choice, list(planner.cache.values()), limit)


def overrides(cfg: Config, p: Prediction) -> dict:
    """The recipe keys to set for prediction `p`, as `key: value`."""
    out = {"train.micro_batch_size": p.micro_batch, "train.grad_checkpointing": p.checkpointing}
    if p.precision != cfg.train.precision:
        out["train.precision"] = p.precision
    return out


def nothing_fits(planner: Planner, result: SearchResult) -> ConfigError:
    """The one line for a budget that no micro-batch fits, with the smallest step's prediction."""
    try:
        smallest = planner.predict(True, 2)
    except ConfigError:  # an arch without checkpointing
        smallest = planner.predict(False, 2)
    cfg = planner.cfg
    return ConfigError(f"nothing fits: even micro-batch 2 with checkpointing {'on' if smallest.checkpointing else 'off'}"
                       f" is predicted at {smallest.peak_bytes / GiB:.2f} GiB, over the {result.usable_bytes / GiB:.2f}"
                       f" GiB usable; lower data.image_size ({cfg.data.image_size}) or moco.queue_size, raise "
                       f"moco.key_chunks (keys are encoded {cfg.train.batch_size // cfg.moco.key_chunks} at a time), "
                       f"or pick a smaller model.arch")

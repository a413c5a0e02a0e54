"""Stopping a run safely: on SIGINT or SIGTERM, or before a step that would pass train.time_limit.

Colab's stop button sends SIGINT, and a session that ends sends SIGTERM. Either one asks the
trainer to finish the optimizer step in progress, write a checkpoint (atomically, as always)
and exit with code 130; a second signal exits at once. The time limit works the same way,
decided before each step from the measured durations of the steps so far.

    with StopRequests(time_limit_s=41400) as stop:
        for ...:
            if stop.reason(): break          # "SIGINT", "SIGTERM", "time_limit" or None
            step()
            stop.step_done()                 # measures the step's duration
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_CODE = 130  # what a shell reports for a run stopped by Ctrl-C; also a stop at the time limit
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RECENT_STEPS = 10  # the next step is assumed to take as long as the longest of these


class StopRequests:
    def __init__(self, time_limit_s: float | None = None, enabled: bool = True, clock=time.monotonic):
        self.time_limit_s, self.clock = time_limit_s, clock
        # Signal handlers can only be set from the main thread (a notebook's kernel runs cells there).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signalled: str | None = None
        self.started = self.last_mark = clock()
        self.recent: list[float] = []  # durations of the last RECENT_STEPS steps, in seconds
        self.saving_s = 0.0  # the longest checkpoint write so far: the stop must have time for one
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if self.enabled:
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self.started = self.last_mark = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.signalled is not None:  # the second one: the user does not want to wait
            print(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_CODE)
        self.signalled = signal.Signals(signum).name
        print(f"\n{self.signalled}: finishing this step and saving a checkpoint (send it again to exit at once)",
              file=sys.stderr, flush=True)

    def step_done(self) -> None:
        """Mark the end of a step: the time since the last mark (data, step, logging) is its duration."""
        now = self.clock()
        self.recent = (self.recent + [now - self.last_mark])[-RECENT_STEPS:]
        self.last_mark = now

    def saved(self, seconds: float) -> None:
        self.saving_s = max(self.saving_s, seconds)
        self.last_mark = self.clock()  # a checkpoint write is not part of the next step

    def next_step_s(self) -> float:
        """The time the next step is expected to take: the longest of the recent ones (0 before any)."""
        return max(self.recent, default=0.0)

    def reason(self) -> str | None:
        """Why the run must stop before the next step, or None to go on."""
        if self.signalled is not None:
            return self.signalled
        if self.time_limit_s is not None:
            finish = self.clock() - self.started + self.next_step_s() + self.saving_s
            if finish > self.time_limit_s:
                return "time_limit"
        return None

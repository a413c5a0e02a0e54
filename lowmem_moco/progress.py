"""What the user sees while training, and what is recorded.

In a terminal: a live rich progress bar with epoch, step, loss, lr, img/s, peak memory and
ETA. When stdout is not a terminal (a notebook's `!` command, a log file), live bars do not
animate, so the same figures come as plain lines every `log_every` steps and at epoch ends.
Every record goes to metrics.jsonl and, with train.log_with, to accelerate's trackers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def _fmt(fields: dict) -> str:
    parts = [f"epoch {fields['epoch']}", f"step {fields['step']}"]
    if "loss" in fields:
        parts.append(f"loss {fields['loss']:.4f}")
    if "lr" in fields:
        parts.append(f"lr {fields['lr']:.3g}")
    if "images_per_sec" in fields:
        parts.append(f"{fields['images_per_sec']:.1f} img/s")
    if "peak_mem_mb" in fields:
        parts.append(f"peak {fields['peak_mem_mb']:.0f} MB")
    if "knn_top1" in fields:
        parts.append(f"kNN top-1 {fields['knn_top1']:.2f}%")
    if fields.get("skipped_steps"):
        parts.append(f"{fields['skipped_steps']} non-finite steps skipped")
    if fields.get("bad_images"):
        parts.append(f"{fields['bad_images']} unreadable images skipped")
    return " | ".join(parts)


def peak_memory_mb(device) -> float:
    """The metrics' peak_mem_mb: the allocator's peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Progress:
    def __init__(self, total_steps: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total = total_steps
        self.started = time.perf_counter()
        self.bar = RichProgress(
            TextColumn("[bold]MoCo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
        ) if self.live else None
        self.task = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, status="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    describe = note = print

    def update(self, fields: dict) -> None:
        if self.bar is not None:
            status = _fmt(fields).split(" | ", 2)[-1]
            self.bar.update(self.task, completed=fields["step"], status=f"epoch {fields['epoch']} | {status}")

    def log_line(self, fields: dict) -> None:
        """Plain periodic line, only when the live bar is not shown."""
        if self.enabled and not self.live:
            done = fields["step"] / max(1, self.total)
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done - elapsed if done > 0 else float("nan")
            self.console.print(f"{_fmt(fields)} | {100 * done:.0f}% | ETA {eta / 60:.1f} min")

    def epoch_line(self, record: dict) -> None:
        done = record.get("kind") == "epoch"
        self.print(f"[bold]{'end of' if done else 'stopped in'}[/] {_fmt(record)}")


def trackers(log_with: str) -> str | None:
    """accelerate's `log_with` for train.log_with; a tracker whose package is missing is named."""
    if log_with == "none":
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[log_with]():
        from .errors import ConfigError

        raise ConfigError(f"train.log_with={log_with} needs the {log_with} package: pip install {log_with}; "
                          f"or set train.log_with=none (metrics.jsonl is always written)")
    return log_with


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines past the checkpoint are dropped
    so that the file reads as if the run had never been interrupted. With trackers, every
    record's numbers are logged too, as `<kind>/<name>` (e.g. step/loss, epoch/knn_top1)."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int, accelerator=None):
        self.path, self.enabled, self.last, self.accelerator = path, enabled, {}, accelerator
        if enabled and path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [json.dumps(r) for r in records
                    if r["step"] <= truncate_after and r.get("kind") != "partial_epoch"]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        self.last = {**self.last, **record}
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            kind = record.get("kind", "step")
            numbers = {f"{kind}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.accelerator.log(numbers, step=record["step"])


class DecodeBar:
    """A rich progress bar in a terminal; start and end lines otherwise (pipes, notebooks' `!`)."""

    def __init__(self, enabled: bool, total: int, title: str):
        self.console = Console(highlight=False, soft_wrap=True)  # one line each, also in log files
        self.enabled, self.title, self.total = enabled, title, total
        self.live = RichProgress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True) if enabled and self.console.is_terminal else None

    def __enter__(self):
        if self.live is not None:
            self.live.start()
            self.task = self.live.add_task(self.title, total=self.total)
        else:
            self.print(self.title)
        self.started = time.perf_counter()
        return self

    def advance(self, n: int) -> None:
        if self.live is not None:
            self.live.advance(self.task, n)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()
        if exc[0] is None:
            self.print(f"{self.title}: done in {time.perf_counter() - self.started:.1f}s")

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

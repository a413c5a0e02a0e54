"""`lowmem-moco plot RUN [RUN ...] [--out curves.png]`: a run's training curves from its
metrics.jsonl, several runs on the same axes.

    fig = draw_curves(["runs/a", "runs/b"])   # a matplotlib Figure, one panel per PANELS entry
    save_curves(["runs/a"], "curves.png")

The figure is built with matplotlib's object API on the Agg canvas, not pyplot: nothing global
changes, so it behaves the same in a script, a test and a notebook kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

INSTALL_HINT = 'pip install "lowmem-moco[plot]"'


@dataclass(frozen=True)
class Panel:
    title: str
    kinds: tuple  # the metrics.jsonl record kinds it reads
    x: str
    y: str


# Per-step quantities come from the step records (one every train.log_every steps); the kNN
# monitor only exists per epoch, and its epoch-0 value (random init) is the "eval" record.
PANELS = (
    Panel("loss per step", ("step",), "step", "loss"),
    Panel("learning rate", ("step",), "step", "lr"),
    Panel("kNN top-1 (%) per epoch", ("eval", "epoch", "partial_epoch"), "epoch", "knn_top1"),
    Panel("images/s", ("step",), "step", "images_per_sec"),
    Panel("peak memory (MB)", ("step",), "step", "peak_mem_mb"),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (or of that file itself), in file order."""
    path = Path(run_dir)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: give the output_dir of a training run (it holds metrics.jsonl)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while writing leaves half a last line: drop it
                break
            raise UserError(f"{path} line {number} is not JSON; fix or delete that line") from None
    if not records:
        raise UserError(f"{path} holds no records yet: train the run for at least train.log_every steps first")
    return records


def series(records: list[dict], panel: Panel) -> tuple[list, list]:
    """(x, y) of one panel: the records of its kinds that carry its value, in file order."""
    points = [(r[panel.x], r[panel.y]) for r in records
              if r.get("kind", "step") in panel.kinds and r.get(panel.y) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def run_label(run_dir: str | Path) -> str:
    """The legend's name of a run: its folder's name (metrics.jsonl given directly: its folder's)."""
    path = Path(run_dir).resolve()
    return (path.parent if path.is_file() else path).name


def draw_curves(run_dirs: list[str | Path]):
    """A Figure with one axis per panel in PANELS (titled as the panel) and one line per run."""
    Figure, FigureCanvasAgg = _matplotlib()
    runs = [(run_label(d), read_metrics(d)) for d in run_dirs]  # every file checked before drawing
    fig = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    for ax, panel in zip(axes, PANELS):
        for label, records in runs:
            x, y = series(records, panel)
            # markers on sparse series: a single point draws no line, and a few kNN epochs read better as dots
            ax.plot(x, y, label=label, marker="o" if len(x) <= 50 else None, markersize=3)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.x)
        if not any(series(records, panel)[0] for _, records in runs):  # e.g. fewer steps than train.log_every
            ax.text(0.5, 0.5, f"no {'/'.join(panel.kinds)} records yet", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(PANELS):]:  # the grid's cells beyond the panels
        ax.remove()
    return fig


def save_curves(run_dirs: list[str | Path], out: str | Path) -> Path:
    out = Path(out)
    fig = draw_curves(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out

"""Reports of a run: a rich table on screen, then JSON, Markdown and a PNG plot side by side.

    benchmarks/results/<host>-<date>.json   every cell, the environment, the targets
    benchmarks/results/<host>-<date>.md     the same tables for a README
    benchmarks/results/<host>-<date>.png    peak memory against micro-batch, one line per configuration
"""

from __future__ import annotations

import math
from pathlib import Path

from .results import markdown_table, write_results

# (heading, key in a cell's record, format, on screen too); the README explains each column.
COLUMNS = [
    ("configuration", "group", "{}", True),
    ("mb", "micro_batch", "{}", True),
    ("peak MB", "peak_mb", "{:.0f}", True),
    ("w/o inputs", "peak_no_input_mb", "{:.0f}", True),
    ("params", "params_mb", "{:.0f}", False),
    ("grads", "grads_mb", "{:.0f}", False),
    ("optim", "optimizer_mb", "{:.0f}", False),
    ("activ", "activations_mb", "{:.0f}", True),
    ("temp", "temporaries_mb", "{:.0f}", True),
    ("inputs", "inputs_mb", "{:.0f}", False),
    ("reserved MB", "reserved_mb", "{:.0f}", True),
    ("RSS MB", "rss_peak_mb", "{:.0f}", False),
    ("RSS +MB", "rss_growth_mb", "{:.0f}", True),
    ("MB/img", "slope_mb_per_image", "{:.2f}", True),
    ("img/s", "images_per_s", "{:.1f}", True),
    ("vs sup", "vs_supervised", "{:.2f}", True),
    ("vs limit", "vs_limit", "{:.2f}", False),
]


def _cell_text(cell: dict, key: str, fmt: str) -> str:
    if cell.get("oom") and key == "peak_mb":
        return "OOM"
    if cell.get("error") and key == "peak_mb":
        return "error"
    value = cell.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _columns(cells: list[dict], screen: bool) -> list[tuple]:
    """Only the columns that some cell has (e.g. no 'reserved' on a CPU)."""
    return [c for c in COLUMNS if (c[3] or not screen) and (
        c[1] in ("group", "micro_batch", "peak_mb") or any(cell.get(c[1]) is not None for cell in cells))]


def rows(cells: list[dict], screen: bool = False) -> tuple[list[str], list[list[str]]]:
    cols = _columns(cells, screen)
    return [c[0] for c in cols], [[_cell_text(cell, key, fmt) for _, key, fmt, _ in cols] for cell in cells]


TARGET_HEADS = ("status", "target", "measured", "what")


def target_rows(targets: list[dict]) -> list[list[str]]:
    out = []
    for t in targets:
        value = "-" if t.get("value") is None else f"{t['value']:.3f}"
        out.append([t["status"], t["name"], f"{value} {t['comparison']} {t['bound']:g}", t["note"]])
    return out


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped to a file or a notebook: keep rows on one line
    heads, body = rows(report["cells"], screen=True)
    table = Table(title=f"lowmem-moco benchmarks on {report['environment']['device_name']}", show_lines=False)
    for i, head in enumerate(heads):
        table.add_column(head, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in body:
        table.add_row(*row)
    console.print(table)
    if report.get("targets"):
        tt = Table(title="targets")
        for head in TARGET_HEADS:
            tt.add_column(head)
        for row in target_rows(report["targets"]):
            style = {"PASS": "green", "MISS": "red"}.get(row[0], "yellow")
            tt.add_row(f"[{style}]{row[0]}[/]", *row[1:])
        console.print(tt)
    for p in report.get("data_input", []):
        console.print(data_line(p))
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def data_line(p: dict) -> str:
    if p.get("images_per_s") is None:
        return f"data input ({p['augment']}): not measured: {p.get('note', '')}"
    workers = f"{p['num_workers']} workers, " if p["augment"] == "per_image" else ""
    return (f"data input ({p['augment']}, {p['source']} images, {p['image_size']} px, {workers}on {p['device']}): "
            f"{p['images_per_s']:.0f} images/s, two views each (set-up {p['setup_s']:.1f} s, not included)")


def markdown(report: dict) -> str:
    env = report["environment"]
    heads, body = rows(report["cells"])
    lines = [f"# lowmem-moco benchmarks: {env['device_name']}", "",
             f"`{report['command']}` on {report['created']}; torch {env['torch']}, timm {env['timm']}, "
             f"{env['threads']} thread(s) per cell; timings: the median of {report['settings']['repeats']} steps, after a "
             f"first step and {report['settings']['warmup']} more warm-up steps (untimed).", "",
             *markdown_table(heads, body)]
    if report.get("targets"):
        lines += ["", *markdown_table(TARGET_HEADS, target_rows(report["targets"]))]
    if report.get("data_input"):
        lines += [""] + [f"- {data_line(p)}" for p in report["data_input"]]
    if report.get("notes"):
        lines += [""] + [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    """PNG of peak memory vs micro-batch; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'lowmem-moco[plot]')"
    groups: dict[str, list] = {}
    for c in report["cells"]:
        if c.get("peak_mb") is not None:
            groups.setdefault(c["group"], []).append((c["micro_batch"], c["peak_mb"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in sorted(groups.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for points in groups.values() for x, _ in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("micro-batch (images)")
    ax.set_ylabel("peak memory of one step (MB)")
    ax.set_title(f"peak memory vs micro-batch, {report['environment']['device_name']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write(report: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """The plot, then the JSON and Markdown through the one results writer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    note = plot(report, png)
    if note:
        report.setdefault("notes", []).append(note)
    paths = write_results(stem, report, markdown(report), out_dir)
    return paths if note else dict(paths, png=png)

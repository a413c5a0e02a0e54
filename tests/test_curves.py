"""`lowmem-moco plot`: the panels, the exact values of metrics.jsonl, several runs, and the
messages for a missing file and a missing matplotlib."""

from __future__ import annotations

import json
import sys

import pytest

from lowmem_moco.cli import main
from lowmem_moco.curves import PANELS, draw_curves
from lowmem_moco.errors import UserError

pytest.importorskip("matplotlib", reason='lowmem-moco plot needs matplotlib: pip install "lowmem-moco[plot]"')


def step(n: int, loss: float) -> dict:
    return {"kind": "step", "momentum": 0.99, "epoch": 1 + (n - 1) // 4, "step": n, "loss": loss,
            "lr": 0.06 / n, "images_per_sec": 10.0 + n, "peak_mem_mb": 800.0 + n}


def write_run(folder, scale: float = 1.0) -> list[dict]:
    """Two epochs of 4 steps logged every 2, as the trainer writes them (eval, steps, epoch records)."""
    records = [{"epoch": 0, "step": 0, "kind": "eval", "knn_top1": 20.0 * scale},
               step(2, 3.5 * scale), step(4, 4.25 * scale),
               {"epoch": 1, "step": 4, "kind": "epoch", "loss": 4.0, "lr": 0.015, "images_per_sec": 12.0,
                "peak_mem_mb": 804.0, "knn_top1": 31.25 * scale},
               step(6, 5.125 * scale), step(8, 5.0 * scale),
               {"epoch": 2, "step": 8, "kind": "epoch", "loss": 5.0, "lr": 0.0075, "images_per_sec": 18.0,
                "peak_mem_mb": 808.0}]  # no kNN this epoch: the kNN panel skips it
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_panels_hold_exactly_the_logged_values(tmp_path):
    records = write_run(tmp_path / "run1")
    fig = draw_curves([tmp_path / "run1"])
    assert titles(fig) == ["loss per step", "learning rate", "kNN top-1 (%) per epoch", "images/s",
                           "peak memory (MB)"]
    steps = [r for r in records if r["kind"] == "step"]
    axes = dict(zip(titles(fig), fig.axes))
    for title, key in [("loss per step", "loss"), ("learning rate", "lr"), ("images/s", "images_per_sec"),
                       ("peak memory (MB)", "peak_mem_mb")]:
        (line,) = axes[title].lines
        assert list(line.get_xdata()) == [r["step"] for r in steps]
        assert list(line.get_ydata()) == [r[key] for r in steps]
    (knn,) = axes["kNN top-1 (%) per epoch"].lines
    assert list(knn.get_xdata()) == [0, 1]  # epoch 0 = before training
    assert list(knn.get_ydata()) == [20.0, 31.25]


def test_two_runs_share_the_axes_with_their_folder_names(tmp_path):
    a, b = write_run(tmp_path / "baseline"), write_run(tmp_path / "fp16", scale=2.0)
    fig = draw_curves([tmp_path / "baseline", tmp_path / "fp16"])
    assert len(fig.axes) == len(PANELS)
    for ax in fig.axes:
        assert [line.get_label() for line in ax.lines] == ["baseline", "fp16"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "fp16"]
    loss = fig.axes[0]
    assert list(loss.lines[0].get_ydata()) == [r["loss"] for r in a if r["kind"] == "step"]
    assert list(loss.lines[1].get_ydata()) == [r["loss"] for r in b if r["kind"] == "step"]


def test_cli_writes_the_png(tmp_path, capsys):
    write_run(tmp_path / "run1")
    out = tmp_path / "pictures" / "curves.png"
    assert main(["plot", str(tmp_path / "run1"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_missing_or_empty_metrics_is_one_error_naming_the_file(tmp_path, capsys, content):
    run = tmp_path / "run1"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match="metrics.jsonl"):
        draw_curves([run])
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "metrics.jsonl") in err


def test_half_written_last_line_is_dropped(tmp_path):
    records = write_run(tmp_path / "run1")
    with open(tmp_path / "run1" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "ste')  # a run killed mid-write
    fig = draw_curves([tmp_path / "run1"])
    assert list(fig.axes[0].lines[0].get_xdata()) == [r["step"] for r in records if r["kind"] == "step"]


def test_without_matplotlib_the_message_says_how_to_install(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run1")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    assert main(["plot", str(tmp_path / "run1"), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "lowmem-moco[plot]"' in err
    assert not (tmp_path / "c.png").exists()

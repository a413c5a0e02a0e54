"""`python -m benchmarks peers` on a tiny cell: lightly's MoCo v2 step beside the project's.

Figures are not asserted (they depend on the machine), only that every row has them, that
both steps start from the same state (same first loss) and that lightly's memory bank moved.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from benchmarks.commands.peers import INSTALL, ROWS, PeerCell, main, markdown

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: threads only wait for each other
TINY = PeerCell("test_resnet", 32, 8, 64, small_image_stem=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`peers --quick` on the tiny cell alone, run once: what it wrote and its exit status. Both
    tests below read this one run (each cell's two steps take seconds even at this size)."""
    pytest.importorskip("lightly", reason=INSTALL)
    out = tmp_path_factory.mktemp("peers")
    threads = torch.get_num_threads()  # --quick sets one thread for the whole process
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr("benchmarks.commands.peers.cells_for", lambda device, quick, precision: [TINY])
            status = main(["--quick", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    [saved] = out.glob("peers-cpu-*.json")
    return status, saved


def test_tiny_cell_has_every_row_and_both_steps_start_alike(quick_run):
    _, saved = quick_run
    [c] = json.loads(saved.read_text())["cells"]  # measure_cell(TINY, cpu, warmup=0, repeats=1), as written
    assert list(c["rows"]) == list(ROWS)
    for name, row in c["rows"].items():
        assert math.isfinite(row["loss"]), name
        assert row["peak_mb"] > 0 and math.isfinite(row["peak_vs_lightly"]), name
        assert row["images_per_s"] > 0 and math.isfinite(row["speed_vs_lightly"]), name
        assert {"params", "grads", "optimizer", "activations", "inputs"} <= set(row["breakdown_mb"]), name
    rows = c["rows"]
    # Same weights, queue and images, BatchNorm over the whole batch in both: the same loss.
    assert rows["same"]["loss"] == pytest.approx(rows["lightly"]["loss"], rel=1e-4)
    assert rows["lightly"]["bank_pointer_after"] == TINY.batch  # lightly enqueued the first step's keys
    assert (rows["quarter"]["micro_batch"], rows["quarter"]["key_chunks"]) == (TINY.batch // 4, 4)
    assert rows["eighth"]["checkpointing"] and not rows["same"]["checkpointing"]
    assert [t["status"] in ("PASS", "MISS") for t in c["targets"]] == [True] * 4
    env = dict(device="cpu", device_name="CPU", created="2026-01-01", torch="t", timm="t", lightly="l", threads=1)
    assert TINY.label in markdown(dict(command="x", environment=env, repeats=1, warmup=0, cells=[c]))


def test_command_writes_its_results(quick_run):
    status, saved = quick_run
    assert status == 0
    r = json.loads(saved.read_text())
    assert r["environment"]["lightly"] and r["environment"]["cpu"] and r["environment"]["threads"] == 1
    assert r["command"].startswith("python -m benchmarks peers --quick")
    assert "lightly" in saved.with_suffix(".md").read_text()


def test_without_lightly_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` now raises ImportError
    assert main(["--quick"]) != 0
    assert '.[peers]' in capsys.readouterr().err

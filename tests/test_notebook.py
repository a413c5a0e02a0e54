"""notebooks/colab_quickstart.ipynb, executed top to bottom by a real Jupyter kernel on a CPU
with tiny parameters: every cell must run (a failing command raises in its cell), and what it
makes (checkpoints, curves, kNN result, resumed run, export) must be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason='the notebook test needs pip install -e ".[notebook]"')
nbclient = pytest.importorskip("nbclient", reason='the notebook test needs pip install -e ".[notebook]"')
pytest.importorskip("ipykernel", reason='the notebook test needs pip install -e ".[notebook]"')
pytest.importorskip("matplotlib", reason='the notebook draws curves: pip install -e ".[plot]"')

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def tiny_parameters(tmp_path: Path) -> str:
    """The parameters cell for a CPU: the demo recipe on 64 synthetic images, 4 steps an epoch;
    the first training cell stops after 2 steps so that the second must resume."""
    return f'''
REPO_URL = ""
RECIPE = "{ROOT / 'recipes' / 'demo.yaml'}"
DATA = "data.source=synthetic data.synthetic_size=64 data.root={tmp_path / 'data'}"
OVERRIDES = "train.batch_size=16 train.micro_batch_size=8 moco.key_chunks=2 moco.queue_size=64 train.log_every=1 eval.knn_every=1"
OUTPUT_DIR = "{tmp_path / 'run'}"
USE_DRIVE = True
EPOCHS = 1
MAX_STEPS = 2
LINEAR_EPOCHS = 2
GPU = "auto"
INSTALL = False
'''


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert params is nb.cells[1]
    names = {line.split("=")[0].strip() for line in params.source.splitlines() if "=" in line}
    assert names == {line.split("=")[0].strip() for line in tiny_parameters(tmp_path).splitlines() if "=" in line}
    params.source = tiny_parameters(tmp_path)
    # The kernel and the commands it runs import this checkout and find this interpreter's scripts.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads of a shared CPU only wait for each other
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a cell that raises fails the test with nbclient's CellExecutionError

    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.safetensors"))[-1] == "step-000000004.safetensors"
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "views.png").is_file()
    assert (run / "backbone.safetensors").is_file()
    outputs = [text_of(c) for c in nb.cells if c.cell_type == "code"]
    train, resume = [o for o in outputs if "accelerate launch" in o]
    assert "resumed from" not in train and "resumed from step-000000002.safetensors (step 2)" in resume
    assert any("knn on synthetic" in o and "top-1" in o for o in outputs)
    assert any("linear on synthetic" in o for o in outputs)
    assert any("features of shape (2, 128)" in o for o in outputs)  # the reloaded backbone's forward
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the views and the curves, shown inline


STOP_SCRIPT = '''
import json, pathlib, threading, time

out = pathlib.Path({out!r})


def steps_done() -> int:
    log = out / "metrics.jsonl"
    return max([json.loads(line).get("step", 0) for line in log.read_text().splitlines()] if log.is_file() else [0])


def press_stop() -> None:  # Colab's stop button: SIGINT to the kernel's own process
    while steps_done() < 2:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=press_stop, daemon=True).start()
try:
    sh({command!r})
except KeyboardInterrupt as err:
    print("cell interrupted:", err)
'''


@pytest.mark.slow
def test_the_stop_button_stops_training_under_accelerate_launch_with_a_checkpoint(tmp_path):
    """The notebook's sh() forwards the interrupt to the trainer alone: accelerate's launcher,
    interrupted itself, would terminate the trainer before it saved."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    helpers = nb.cells[3].source.split("\n\nif INSTALL")[0]  # sh() and what it needs
    out = tmp_path / "run"
    command = (f"accelerate launch -m lowmem_moco train {ROOT / 'recipes' / 'demo.yaml'} data.source=synthetic "
               f"data.synthetic_size=640 train.batch_size=16 train.micro_batch_size=8 moco.key_chunks=2 "
               f"moco.queue_size=64 train.log_every=1 eval.knn_every=0 train.epochs=1 output_dir={out}")
    script = tmp_path / "stop.py"
    script.write_text(helpers + STOP_SCRIPT.format(out=str(out), command=command))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert "cell interrupted: stopped; a training run kept its newest checkpoint" in done.stdout, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [stop] = [r for r in records if r["kind"] == "stop"]
    assert stop["reason"] == "SIGINT" and 2 <= stop["step"] < 40
    assert (out / "checkpoints" / f"step-{stop['step']:09d}.safetensors").is_file()

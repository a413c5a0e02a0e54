"""Stopping safely: a real SIGINT mid-epoch, train.time_limit, a second signal; each stopped run
resumes to the same weights, bit for bit, as a run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowmem_moco
import lowmem_moco.trainer as trainer_module
from lowmem_moco.checkpoint import list_checkpoints
from lowmem_moco.config import load_config, parse_override
from lowmem_moco.errors import ConfigError
from lowmem_moco.stopping import EXIT_CODE, StopRequests
from lowmem_moco.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.source=synthetic", "data.synthetic_size=320", "data.image_size=32", "data.num_workers=0",
    "model.arch=test_resnet", "model.dim=16", "moco.queue_size=64", "moco.key_chunks=2", "moco.momentum=0.9",
    "train.batch_size=16", "train.micro_batch_size=8", "train.epochs=1", "train.lr=0.05",
    "train.log_every=1", "train.checkpoint_every=0", "eval.knn_every=0",
]
STEPS = 20  # 320 images / 16


def final_weights(out: Path) -> dict:
    return load_file(list_checkpoints(out)[-1])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = final_weights(resumed), final_weights(reference)
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the interrupted subprocess runs (OMP_NUM_THREADS=1)
    Trainer(load_config(None, [*TINY, f"output_dir={out}"])).fit()
    torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_sigint_mid_epoch_saves_a_checkpoint_exits_130_and_the_resumed_run_is_identical(tmp_path, uninterrupted,
                                                                                         one_cpu_thread):
    out, recipe = tmp_path / "run", tmp_path / "defaults.yaml"
    recipe.write_text("{}\n")  # the schema's defaults, then TINY: the same config as the reference run
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_moco", "train", str(recipe), *TINY, f"output_dir={out}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # wait for step 3 of 20: mid-epoch
        if (out / "metrics.jsonl").is_file() and any(r.get("step", 0) >= 3 for r in records(out)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE, stderr
    assert "run the same command again to resume" in stdout
    stop = [r for r in records(out) if r["kind"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == "SIGINT" and 3 <= stop[0]["step"] < STEPS
    assert list_checkpoints(out)[-1].name == f"step-{stop[0]['step']:09d}.safetensors"
    assert not (out / "backbone.safetensors").exists()  # a stopped run is not finished: no export

    trainer = Trainer(load_config(None, [*TINY, f"output_dir={out}"]))
    assert trainer.step == stop[0]["step"]
    trainer.fit()
    assert trainer.stopped is None and trainer.step == STEPS
    assert_same_run(out, uninterrupted)


class StepClock:
    """A clock that advances 10 s per finished step, so the time limit falls at a known step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_limit_stops_before_the_step_that_would_pass_it_and_resumes_identically(tmp_path, uninterrupted,
                                                                                     monkeypatch, one_cpu_thread):
    clock = StepClock()
    real_done = StopRequests.step_done

    def step_done(self):
        clock.now += 10.0
        real_done(self)
    monkeypatch.setattr(StopRequests, "step_done", step_done)
    monkeypatch.setattr(trainer_module, "StopRequests", lambda limit: StopRequests(limit, clock=clock))
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, [*TINY, f"output_dir={out}", "train.time_limit=75s"]))
    trainer.fit()
    # After 7 steps (70 s) the next one, measured at 10 s, would end at 80 s > 75 s.
    assert trainer.stopped == "time_limit" and trainer.step == 7
    assert records(out)[-1] == {**records(out)[-1], "kind": "stop", "reason": "time_limit", "step": 7}
    monkeypatch.undo()
    assert lowmem_moco.train(None, {**dict(map(parse_override, TINY)), "output_dir": str(out)}) == out
    assert_same_run(out, uninterrupted)


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.reason() == "SIGTERM" and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [EXIT_CODE]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


@pytest.mark.parametrize("text", ["5", "0s", "ten minutes", "30m2h"])
def test_a_time_limit_that_is_not_a_duration_names_the_key_and_an_example(text):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.time_limit={text}"])
    assert "train.time_limit" in str(err.value) and "11h30m" in str(err.value)

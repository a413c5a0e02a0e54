"""A run survives being killed, damaged checkpoints, non-finite losses and user mistakes."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lowmem_moco.checkpoint import list_checkpoints, load_latest, read_checkpoint, save_checkpoint
from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.errors import CheckpointError, UserError
from lowmem_moco.engine.step import MoCoStep, StepResult
from lowmem_moco.trainer import Trainer
from support import REPO, missing, raises_naming, read_jsonl

TINY = ["data.source=synthetic", "data.synthetic_size=128", "data.image_size=32", "data.num_workers=0",
        "model.arch=test_resnet", "model.dim=16", "moco.queue_size=64", "moco.key_chunks=2",
        "train.batch_size=32", "train.micro_batch_size=16", "train.epochs=3", "eval.knn_every=0"]

DEMO_MODEL_OFF = ["model.small_image_stem=false", "model.timm_kwargs=null"]  # the demo's ResNet switches


def tiny(out, *extra):
    return load_config(None, [*TINY, f"output_dir={out}", *extra])


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_round_trip_exactly_and_only_the_newest_are_kept(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(2.5, dtype=torch.bfloat16)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tensors, {"step": step, "note": [1, "x"]}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002.safetensors", "step-000000003.safetensors"]
    loaded, meta, path = load_latest(tmp_path)
    assert meta["step"] == 3 and meta["note"] == [1, "x"]
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))}, {"step": step})
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF  # one bit pattern changed inside the tensor bytes
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        read_checkpoint(newest)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        tensors, meta, path = load_latest(tmp_path)
    assert meta["step"] == 1 and path.name == "step-000000001.safetensors"


def test_only_damaged_checkpoints_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(10)}, {"step": 1})
    list_checkpoints(tmp_path)[0].write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
            load_latest(tmp_path)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_result(tmp_path):
    def command(out):  # both runs in fresh processes, so both use the same threads and kernels
        return [sys.executable, "-m", "lowmem_moco", "train", str(REPO / "recipes/demo.yaml"), *TINY,
                *DEMO_MODEL_OFF, "train.checkpoint_every=1", "train.epochs=2", f"output_dir={out}", f"data.cache_dir={tmp_path}/cache"]

    # One thread in both: a tiny model, and on a busy 2-core machine more threads only spin.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    assert subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True).returncode == 0
    cmd = command(tmp_path / "killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list_checkpoints(tmp_path / "killed")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-step, possibly mid-write
    proc.wait()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    a, _, _ = load_latest(tmp_path / "whole")
    b, _, _ = load_latest(tmp_path / "killed")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ---------------------------------------------------------------- non-finite losses


def test_non_finite_steps_are_counted_and_too_many_stop_the_run_keeping_the_checkpoint(tmp_path, monkeypatch):
    """Catches: stopping after more (or fewer) than max_nonfinite_steps bad steps in a row, and a
    newest checkpoint that lost the weights of the last good step."""
    trainer = Trainer(tiny(tmp_path, "train.max_nonfinite_steps=3", "train.checkpoint_every=1"))
    real_step = MoCoStep.__call__
    calls, good = {"n": 0}, {}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            return StepResult(float("nan"), skipped=True)
        result = real_step(self, *args)
        good.update({f"model.{k}": v.clone() for k, v in trainer.moco.state_dict().items()})
        return result

    monkeypatch.setattr(MoCoStep, "__call__", flaky)
    with raises_naming(UserError, "3 steps in a row", "train.lr"):
        trainer.fit()
    assert calls["n"] == 2 + 3  # two good steps, then stopped at the third bad one
    tensors, meta, _ = load_latest(tmp_path)
    assert meta["counters"]["skipped_steps"] == 2  # the newest checkpoint: after 2 skips, before the third
    assert [k for k in good if not torch.equal(tensors[k], good[k])] == []


# ---------------------------------------------------------------- user mistakes


def test_output_dir_that_cannot_be_created_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is not writable"):
        Trainer(tiny(blocker / "run"))


def test_data_set_smaller_than_one_batch(tmp_path):
    with pytest.raises(UserError, match="fewer than one batch"):
        Trainer(tiny(tmp_path, "data.synthetic_size=16"))


def test_an_unreadable_image_is_counted_once_per_epoch_in_bad_images(tmp_path):
    """Per-image path: a truncated JPEG is skipped, and each epoch's record counts it once."""
    from PIL import Image

    data = tmp_path / "data"
    for n in range(32):  # one batch (train.batch_size=32): every image is drawn every epoch
        (data / "ab"[n % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (7 * n, 40, 90)).save(data / "ab"[n % 2] / f"{n}.jpg")
    whole = (data / "a" / "0.jpg").read_bytes()
    (data / "a" / "0.jpg").write_bytes(whole[:len(whole) // 2])
    cfg = tiny(tmp_path / "run", "data.source=folder", f"data.root={data}", "data.val_fraction=0",
               "data.image_size=16", "data.augment=per_image", "train.epochs=2")
    Trainer(cfg).fit()
    assert [r["bad_images"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"] == [1, 1]


def test_resume_with_another_effective_batch_is_refused(tmp_path):
    Trainer(tiny(tmp_path, "train.max_steps=1")).fit()
    with pytest.raises(CheckpointError, match="train.batch_size=32"):
        Trainer(tiny(tmp_path, "train.batch_size=64"))


def test_out_of_memory_names_the_planner_and_the_overrides(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path))

    def oom(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(MoCoStep, "__call__", oom)
    with raises_naming(UserError, "train.micro_batch_size=auto", "lowmem-moco plan", "train.micro_batch_size=8"):
        trainer.fit()


def test_cli_hides_tracebacks_unless_debug(tmp_path, capsys):
    args = ["train", str(REPO / "recipes/demo.yaml"), "moco.key_chunks=1000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and missing(err, "moco.key_chunks", "1000") == []
    with pytest.raises(UserError):
        main(["--debug", *args])


# ---------------------------------------------------------------- soak


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.usefixtures("one_cpu_thread")  # 2000 tiny steps: two threads on a busy CPU only spin
def test_soak_2000_steps_memory_stays_flat_and_the_queue_stays_a_ring():
    """No leaked graphs, no queue growth: RSS at the end matches the start. (Step time is a
    benchmark's business: a timed assert here failed whenever the machine was busy.)"""
    from accelerate import Accelerator

    from lowmem_moco.engine.moco import MoCo

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 16))
    moco = MoCo(encoder, queue_size=256, dim=16)
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.01, momentum=0.9)
    step = MoCoStep(moco, opt, Accelerator(cpu=True), micro_batch=8, key_chunks=2, temperature=0.2)
    x = torch.randn(16, 3, 8, 8)
    rss, pointers = [], []
    for i in range(2000):
        if i == 1999:
            before_last = moco.queue.clone()
        step(x, x.flip(3), 0.99)
        pointers.append(int(moco.queue_ptr))
        if i in (200, 1999):
            rss.append(_rss_mb())
    # Every step enqueued its 16 keys into the ring of 256 (none skipped, none twice), and the last
    # one replaced the 16 oldest keys only.
    assert pointers == [16 * (i + 1) % 256 for i in range(2000)]
    replaced = (moco.queue != before_last).any(dim=1).nonzero().flatten().tolist()
    assert replaced == list(range(1999 * 16 % 256, 1999 * 16 % 256 + 16))
    assert rss[1] - rss[0] < 20, f"memory grew from {rss[0]:.0f} to {rss[1]:.0f} MB"

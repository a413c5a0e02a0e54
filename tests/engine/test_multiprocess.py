"""Data parallel training: 2 CPU processes (gloo) launched through accelerate against one process.

The equivalence checked here, for an effective batch of 32:

- 2 processes x micro-batch 8 (2 per process) make the same query BatchNorm groups as one
  process with micro-batch 8 (4 micro-batches): process r holds micro-batches 2r and 2r+1.
  Each process's loss is the mean over its share and DDP averages the two gradients, so the
  update is the one of the mean over all 32 queries.
- moco.shuffle_across_processes=true with 2 key chunks per process draws the same permutation
  of the 32 keys as one process with 4 key chunks (same generator, same call), and process r
  encodes chunks 2r and 2r+1 of it: the same key BatchNorm groups, so the runs are equal
  up to fp32 summation order (checked to 1e-5 of each tensor's scale, about 1e-6 observed).
- shuffle_across_processes=false shuffles each process's 16 keys on its own, which no
  single-process run does (it always shuffles the whole batch); the reference there is the
  single-process trainer with its key encoding split into the two halves, each shuffled by
  the shared generator as both processes do.

Run as a script (under `accelerate launch`), this file is the worker: it trains and dumps
each process's final state.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]  # run as a script too: support.py is not on its path
STEPS = 3

# test_efficientnet: BatchNorm, no max-pool. A max-pool over the synthetic shapes' flat regions
# routes gradients by near-ties that fp32 round-off flips, which would make the comparison chaotic.
COMMON = [
    "data.source=synthetic", "data.synthetic_size=128", "data.image_size=32", "data.num_workers=0",
    "model.arch=test_efficientnet", "model.dim=16", "moco.queue_size=64", "moco.momentum=0.9",
    "train.batch_size=32", "train.micro_batch_size=8", "train.epochs=1", f"train.max_steps={STEPS}",
    "train.lr=0.05", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=3",
    "eval.knn_every=0",
]


def overrides(out: Path, shuffle: bool, key_chunks: int, *extra: str) -> list[str]:
    return [*COMMON, f"output_dir={out}", f"moco.key_chunks={key_chunks}",
            f"moco.shuffle_across_processes={str(shuffle).lower()}", *extra]


def snapshot(trainer, last: dict) -> dict:
    state = {f"moco.{k}": v.detach().cpu().clone() for k, v in trainer.moco.state_dict().items()}
    for i, p in enumerate(trainer.moco.encoder_q.parameters()):
        state[f"sgd_momentum.{i}"] = trainer.optimizer.state[p]["momentum_buffer"].detach().cpu().clone()
    state["loss"] = torch.tensor(last["loss"])
    return state


def worker(out: Path) -> None:
    """One of the launched processes: both shuffle modes, 2 key chunks per process."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from lowmem_moco.config import load_config
    from lowmem_moco.trainer import Trainer

    for shuffle in (False, True):
        run_dir = out / f"shuffle-{shuffle}"
        trainer = Trainer(load_config(None, overrides(run_dir, shuffle, 2)))
        assert type(trainer.encoder_q).__name__ == "DistributedDataParallel" and trainer.acc.num_processes == 2
        syncs = []  # gradient all-reduces of the first bucket: one per step if no_sync works

        def counting_allreduce(_, bucket):
            syncs.append(bucket.index())
            return allreduce_hook(None, bucket)

        trainer.encoder_q.register_comm_hook(None, counting_allreduce)
        last = trainer.fit()
        state = snapshot(trainer, last)
        state["gradient_syncs"] = torch.tensor(syncs.count(0))
        torch.save(state, run_dir / f"rank{trainer.acc.process_index}.pt")


# ---------------------------------------------------------------- BatchNorm statistics, without processes


@pytest.mark.parametrize("momentum", [0.1, None])  # exponential, cumulative average
def test_merged_running_stats_equal_one_process_running_every_batch_in_turn(momentum):
    from lowmem_moco.engine.distributed import bn_snapshot, merge_bn_stats

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    bn(torch.randn(4, 3, 2, 2) + 1)  # not the initial statistics
    batches = [torch.randn(4, 3, 2, 2) * (i + 1) + i for i in range(6)]
    sequential, ranks = copy.deepcopy(bn), [copy.deepcopy(bn) for _ in range(3)]
    for x in batches:
        sequential(x)
    snapshots = [bn_snapshot(r) for r in ranks]
    for r, mine in zip(ranks, (batches[0:2], batches[2:4], batches[4:6])):
        for x in mine:
            r(x)
    flats = torch.stack([torch.cat([r.running_mean, r.running_var]) for r in ranks])

    class ThreeProcesses:  # gathers what the three processes hold
        num_processes = 3

        @staticmethod
        def gather(_):
            return flats

    for r, snap in zip(ranks, snapshots):
        merge_bn_stats(snap, ThreeProcesses)
        assert torch.allclose(r.running_mean, sequential.running_mean, atol=1e-6)
        assert torch.allclose(r.running_var, sequential.running_var, atol=1e-6, rtol=1e-6)
        assert int(r.num_batches_tracked) == int(sequential.num_batches_tracked) == 7


# ---------------------------------------------------------------- 2 processes through accelerate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(out: Path, shuffle: bool, key_chunks: int, *extra: str) -> tuple[dict, object]:
    from lowmem_moco.config import load_config
    from lowmem_moco.trainer import Trainer

    trainer = Trainer(load_config(None, overrides(out, shuffle, key_chunks, *extra)))
    return snapshot(trainer, trainer.fit()), trainer


def keys_in_two_halves(encoder_k, images, num_chunks, generator, accelerator, shuffle_across_processes=False):
    """What 2 processes without the cross-process shuffle compute, in one process: each half of
    the batch shuffled by the same generator state and encoded in num_chunks chunks, in rank order."""
    from lowmem_moco.engine.keys import encode_keys
    from lowmem_moco.engine.views import whole

    start, keys = generator.get_state(), []
    for half in whole(images).chunk(2):
        generator.set_state(start)
        keys.append(encode_keys(encoder_k, half, num_chunks, generator))
    keys = torch.cat(keys)
    return keys, keys


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype.is_floating_point:
            # fp32 sums in another order (the all-reduce, 2 vs 4 accumulated micro-batches): within
            # 1e-5 of the tensor's scale (a gradient that sums many terms is only that exact)
            error, scale = (a[name] - b[name]).abs().max(), b[name].abs().max()
            assert error <= 1e-6 + 1e-5 * scale, f"{what}: {name} differs by {error:.2e} (scale {scale:.2e})"
        else:
            assert torch.equal(a[name], b[name]), f"{what}: {name}"


@pytest.mark.slow
def test_two_processes_equal_each_other_and_the_single_process_trainer(tmp_path, monkeypatch, request):
    from support import read_jsonl  # not at the top: this file also runs as the launched script

    started = time.perf_counter()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
           f"--main_process_port={free_port()}", str(Path(__file__).resolve()), str(tmp_path / "ddp")]
    # ACCELERATE_USE_CPU: processes on the CPU with gloo (`--cpu` would start a single process).
    env = dict(os.environ, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(1)  # as in the launched processes, for the same fp32 summation order
    for shuffle in (False, True):
        run_dir = tmp_path / "ddp" / f"shuffle-{shuffle}"
        ranks = [torch.load(run_dir / f"rank{r}.pt") for r in (0, 1)]
        # Only the main process writes the log: one record per step, not one per process.
        logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step"]
        assert logged == list(range(1, STEPS + 1))
        # The same state on both processes: parameters, queue, optimizer, BatchNorm statistics, loss.
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), f"shuffle={shuffle}: {name} differs between ranks"
        assert int(ranks[0]["moco.queue_ptr"]) == STEPS * 32 % 64
        assert int(ranks[0].pop("gradient_syncs")) == STEPS  # none on the first of each step's 2 micro-batches
        ranks[1].pop("gradient_syncs")

        if shuffle:
            ref, _ = single_process(tmp_path / "single-on", True, 4)
        else:
            with monkeypatch.context() as m:
                m.setattr("lowmem_moco.engine.step.encode_batch_keys", keys_in_two_halves)
                ref, _ = single_process(tmp_path / "single-off", False, 2)
        assert_close(ranks[0], ref, f"shuffle={shuffle}")

    # Resume under another number of processes: the 2-process checkpoint of step 2, continued on
    # one process with the equivalent chunking, ends where the single-process run ends.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "ddp" / "shuffle-True" / "checkpoints" / "step-000000002.safetensors",
                resumed / "checkpoints")
    state, trainer = single_process(resumed, True, 4)
    assert trainer.step == STEPS and trainer.resumed_processes == 2
    assert_close(state, ref, "resumed on 1 process")
    print(f"2-process test: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))

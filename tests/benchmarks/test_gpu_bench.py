"""`python -m benchmarks gpu --smoke`: the GPU machine's one command, at tiny sizes on a CPU;
and its exit status, which must say when a section failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.commands import gpu
from benchmarks.harness.images import CIFAR10_TARBALL


@pytest.mark.slow  # every section for real (a pytest run, a training run, lightly): 25 s; the stand-ins below are quick
def test_gpu_command_smoke_writes_every_section(tmp_path):
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG tarball not found at {CIFAR10_TARBALL}")
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--tarball", str(CIFAR10_TARBALL)]) == 0
    [result] = tmp_path.glob("gpu-cpu-smoke-*.json")
    r = json.loads(result.read_text())
    assert r["failed"] == {}
    # pytest's own exit status 0: the CUDA test was collected (and skipped on this CPU); 5 would fail
    assert r["cuda_tests"]["returncode"] == 0 and r["cuda_tests"]["passed"]
    assert {(c["micro_batch"], c["checkpointing"]) for c in r["planner"]} == {(4, False), (8, False), (4, True),
                                                                             (8, True)}
    assert all(abs(c["error"]) < 0.05 for c in r["planner"])  # planner vs real CPU tensors
    sp = r["speed"]
    assert sp["moco_over_supervised"] == pytest.approx(sp["moco"]["images_per_s"] / sp["supervised"]["images_per_s"])
    # syncs per optimizer step: not measured without a GPU; rehearsed (fp16 on a T4: the loss read, the scaler's check)
    assert sp["syncs"]["measured"] == {"count": None, "reason": "no GPU", "sites": []}
    rehearsed = sp["syncs"]["rehearsed"]
    assert rehearsed["gpu"] == "t4" and rehearsed["precision"] == "fp16"
    assert isinstance(rehearsed["count"], int) and 1 <= rehearsed["count"] <= 2 and rehearsed["sites"]
    # every CPU path of the pipeline section measured, on the smoke's CIFAR-10 JPEGs (64 asked: 7 a class)
    assert {"per_image", "batched_cpu", "batched_cpu_workers"} <= r["pipeline"].keys()
    assert r["pipeline"]["images"] == 70 and r["pipeline"]["batches"] == 2
    assert r["cifar"]["epochs"] == 1 and r["cifar"]["knn_top1"][0] is not None
    md = result.with_suffix(".md").read_text()
    assert "FAILED" not in md and f"kNN top-1 {r['cifar']['knn_top1']}" in md
    assert "| measured on this GPU" in md and "| not measured (no GPU) |" in md
    assert f"| rehearsed, predicted (lowmem-moco rehearse on fake CUDA as a t4, fp16) | {rehearsed['count']} |" in md
    assert all(f"| {mb} | {'on' if ckpt else 'off'} |" in md for mb in (4, 8) for ckpt in (False, True))
    # lightly's step beside ours: its own results files, or a skip naming the extra
    assert r["peers"].get("skipped") or [Path(f).name[:10] for f in r["peers"]["files"]] == ["peers-cpu-"] * 2


@pytest.fixture
def quick_sections(monkeypatch):
    """Every section of the command replaced by a stand-in that returns at once."""
    monkeypatch.setattr(gpu, "cuda_tests", lambda device: dict(returncode=0, summary="1 skipped", passed=True))
    monkeypatch.setattr(gpu, "planner_vs_measured", lambda s, device, log: [])
    monkeypatch.setattr(gpu, "speed", lambda s, device: dict(cell="tiny", moco_over_supervised=None))
    monkeypatch.setattr(gpu, "measure_section", lambda *a, **k: dict(image_size=32, per_image=10.0))
    monkeypatch.setattr(gpu, "cifar_run", lambda s, tarball, work: dict(epochs=1, s_per_epoch=[1.0], knn_top1=[10.0],
                                                                       whole_process_s=1.0))
    monkeypatch.setattr(gpu, "environment", lambda device: dict(device_name="CPU", torch=torch.__version__))
    monkeypatch.setattr(gpu.peers, "gpu_section", lambda smoke, device, out_dir: dict(skipped="stand-in"))


def test_a_failing_section_gives_a_non_zero_exit_and_the_others_still_run(tmp_path, monkeypatch, quick_sections):
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0  # the stand-ins alone pass

    def broken(*args, **kwargs):
        raise RuntimeError("no images")

    monkeypatch.setattr(gpu, "measure_section", broken)
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 1
    [result] = tmp_path.glob("gpu-cpu-smoke-*.json")
    r = json.loads(result.read_text())
    assert r["failed"] == {"pipeline": "RuntimeError: no images"}
    assert r["cifar"]["epochs"] == 1  # the section after the failed one ran
    assert "input pipeline: FAILED: RuntimeError: no images" in result.with_suffix(".md").read_text()


@pytest.mark.parametrize("device, summary, returncode, passed", [
    ("cpu", "1 skipped in 0.1s", 0, True),
    ("cuda", "1 passed in 0.1s", 0, True),
    ("cuda", "1 skipped in 0.1s", 0, False),  # on a GPU, a CUDA test must run
    ("cuda", "1 deselected in 0.1s", 5, False),  # pytest: no test collected
    ("cpu", "1 deselected in 0.1s", 5, False),
    ("cuda", "1 failed, 2 passed in 0.1s", 1, False),
])
def test_cuda_tests_pass_only_when_pytest_passed_and_on_a_gpu_one_ran(monkeypatch, device, summary, returncode, passed):
    class Done:
        stdout = f"...\n{summary}\n"

    Done.returncode = returncode
    monkeypatch.setattr(gpu.subprocess, "run", lambda *a, **k: Done)
    assert gpu.cuda_tests(torch.device(device))["passed"] is passed

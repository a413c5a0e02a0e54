"""`python -m benchmarks gpu --smoke`: the GPU machine's one command, at tiny sizes on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu import TARBALL as CIFAR_TARBALL, main


def test_gpu_command_smoke_writes_every_section(tmp_path):
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG tarball not found at {CIFAR_TARBALL}")
    assert main(["--smoke", "--out", str(tmp_path), "--tarball", str(CIFAR_TARBALL)]) == 0
    [result] = tmp_path.glob("gpu-cpu-smoke-*.json")
    r = json.loads(result.read_text())
    assert r["cuda_tests"]["passed"]  # skipped without a GPU, run with one
    assert {(c["micro_batch"], c["checkpointing"]) for c in r["planner"]} == {(4, False), (8, False), (4, True),
                                                                             (8, True)}
    assert all(abs(c["error"]) < 0.05 for c in r["planner"])  # planner vs real CPU tensors
    assert r["speed"]["moco_over_supervised"] > 0
    assert r["pipeline"]["batched_cpu"] > 0
    assert r["cifar"]["epochs"] == 1 and r["cifar"]["knn_top1"][0] is not None
    assert "Planner (predicted) vs measured" in result.with_suffix(".md").read_text()
    assert r["peers"].get("skipped") or [Path(f).name[:10] for f in r["peers"]["files"]] == ["peers-cpu-"] * 2

"""The command registry of `python -m benchmarks`, the one results writer, and the input paths
built through the trainer's own pipeline."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

from benchmarks.commands import COMMANDS, HIDDEN, dispatch, help_line
from benchmarks.harness.inputs import measure_paths
from benchmarks.harness.results import REPO_ROOT, markdown_table, write_results

BENCHMARKS = REPO_ROOT / "benchmarks"


def test_every_command_has_a_main_and_a_help_line_and_help_lists_them(capsys):
    for name, (module, prefix) in COMMANDS.items():
        command = importlib.import_module(f"benchmarks.commands.{module}")
        assert callable(command.main), name
        if not prefix:  # the help line is the module docstring's first line
            assert help_line(name) == command.__doc__.strip().splitlines()[0]
    assert dispatch(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [n for n in COMMANDS if n not in HIDDEN]
    assert dispatch(["no-such-command"]) == 2


def test_an_alias_runs_its_command_with_its_arguments_first(monkeypatch):
    inputs = importlib.import_module("benchmarks.commands.inputs")
    seen = []
    monkeypatch.setattr(inputs, "main", lambda argv: seen.append(argv) or 0)
    assert dispatch(["caches", "--image-size", "96"]) == 0
    assert dispatch(["input-memory", "--batch", "8"]) == 0
    assert seen == [["caches", "--image-size", "96"], ["memory", "--batch", "8"]]


def test_write_results_writes_json_and_markdown_side_by_side(tmp_path):
    paths = write_results("x-cpu", {"a": [1, 2]}, "# x", tmp_path)
    assert paths == {"json": tmp_path / "x-cpu.json", "md": tmp_path / "x-cpu.md"}
    assert json.loads(paths["json"].read_text()) == {"a": [1, 2]} and paths["md"].read_text() == "# x\n"
    # a stem given as a path (a command's --out) keeps its folder; a .md suffix is dropped
    assert write_results(tmp_path / "sub" / "y.md", {}, "y")["json"] == tmp_path / "sub" / "y.json"
    assert markdown_table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]


def test_benchmarks_use_no_private_name_of_lowmem_moco():
    for path in BENCHMARKS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowmem_moco"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and not any(p.startswith("_") for p in node.module.split(".")), (path, node.module)


def test_every_benchmark_module_is_under_300_lines():
    assert {p.name: n for p in BENCHMARKS.rglob("*.py") if (n := len(p.read_text().splitlines())) >= 300} == {}


@pytest.mark.usefixtures("one_cpu_thread")
def test_input_paths_time_the_pipeline_and_the_stores_it_opens(cifar_folder, tmp_path):
    names = ["per_image", "batched_cpu", "decoded", "encoded", "none", "encoded_decode"]
    r = measure_paths(cifar_folder, 32, names, batch=16, n_batches=2, workers=0, cache_dir=tmp_path)
    assert r["images"] == 400 and r["batches"] == 2  # every image trains: nothing held out
    assert all(r[n] > 0 for n in names)
    # one cache per data.cache mode that has one, its size from the store's manifest
    assert set(r) >= {"decoded_cache", "encoded_cache"} and "none_cache" in r
    assert r["decoded_cache"]["bytes_per_image"] >= 32 * 32 * 3  # CIFAR-10's 32x32 RGB, kept whole
    assert r["encoded_cache"]["bytes_per_image"] < r["decoded_cache"]["bytes_per_image"]  # JPEG bytes


@pytest.mark.slow  # 8 s; tests/plan/test_plan.py checks the same prediction against real CPU tensors
@pytest.mark.usefixtures("one_cpu_thread")
def test_plan_check_smoke_runs_and_writes_nothing(tmp_path):
    assert dispatch(["plan-check", "--smoke", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []

"""The benchmark suite end to end on a tiny grid, plus its small pure parts.

Figures are not asserted against bounds (they depend on the machine); what is asserted is how
they hang together (a peak is its categories' sum, img/s is the batch over the median step)
and that the report files are written.
"""

import importlib.util
import json
import statistics

import pytest
import torch

from benchmarks.commands.fit import largest_fitting, overrides
from benchmarks.harness.cells import Cell
from benchmarks.harness.measure import measure
from benchmarks.harness.naive import NaiveMoCo
from benchmarks.harness.suite import derive, run_suite
from benchmarks.harness.targets import check
from lowmem_moco.backbones import build_encoder

TINY = dict(arch="test_resnet", image_size=32, queue_size=64, key_chunks=2)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: threads only wait for each other


@pytest.mark.slow  # a process per cell: 10 s; test_interleaved_timing_... measures cells in this process
def test_suite_on_a_tiny_grid_writes_every_report(tmp_path):
    cells = [Cell("naive", micro_batch=4, **TINY), Cell("lowmem", micro_batch=4, batch=8, checkpointing=True, **TINY)]
    data_input = dict(image_size=32, batch=16, n_batches=2, num_workers=0)
    report = run_suite(cells, tmp_path, warmup=0, repeats=1, data_input=data_input, stem="tiny", show=False,
                       threads=1, interleave=False)  # one process per cell: fewer start-ups, a faster test

    assert (tmp_path / "tiny.json").is_file() and (tmp_path / "tiny.md").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "tiny.png").stat().st_size > 0
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert len(saved["cells"]) == 2
    for cell in saved["cells"]:
        assert "error" not in cell, cell.get("error")
        parts = cell["breakdown_mb"]
        assert {"params", "grads", "optimizer", "activations", "inputs"} <= set(parts)
        # on a CPU the peak is MemTracker's total: the sum of its categories at that moment
        assert cell["peak_mb"] == pytest.approx(parts["total"])
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], rel=1e-6)
        assert cell["peak_no_input_mb"] == pytest.approx(cell["peak_mb"] - parts["inputs"])
        assert parts["inputs"] > 0 and parts["params"] > 0 and parts["activations"] > 0
        assert cell["images_per_s"] == pytest.approx(cell["batch"] / cell["step_s"])
        assert cell["rss_peak_mb"] >= cell["rss_base_mb"]
    table = (tmp_path / "tiny.md").read_text()
    assert all(c["group"] in table for c in saved["cells"])
    assert report["targets"] and all(t["status"] == "not measured" for t in report["targets"])
    # one record per data.augment mode, both measured through the trainer's pipeline
    assert [r["augment"] for r in saved["data_input"]] == ["per_image", "batched"]
    for r in saved["data_input"]:
        assert r["images_per_s"] is not None, r.get("note")
        assert r["timed_batches"] == 2 and r["images"] >= 3 * r["batch"]


def test_interleaved_timing_gives_every_cell_its_own_figures():
    cells = [Cell("naive", micro_batch=4, **TINY), Cell("supervised", arch="test_resnet", image_size=32, micro_batch=4)]
    out = measure(None, cells, torch.device("cpu"), warmup=0, repeats=2)
    assert out["memory"] is None and len(out["time"]) == 2
    for cell, t in zip(cells, out["time"]):
        assert len(t["step_s_all"]) == 2 and t["timed_with"] == 2
        assert t["step_s"] == statistics.median(t["step_s_all"])
        assert t["images_per_s"] == pytest.approx(cell.batch / t["step_s"])


def test_naive_step_keeps_k_keys_and_leaves_the_key_encoder_without_gradients():
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet", 32, False, 16)
    naive = NaiveMoCo(encoder, torch.optim.SGD(encoder.parameters(), lr=0.1), queue_size=12, dim=16,
                      temperature=0.2, momentum=0.9, device=torch.device("cpu"))
    for _ in range(2):
        loss = naive(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(torch.tensor(loss))
    assert naive.queue.shape == (12, 16)
    assert all(p.grad is None for p in naive.encoder_k.parameters())


def test_largest_fitting_is_a_binary_search_over_sorted_candidates():
    sizes = [2, 4, 8, 16, 32, 64, 128, 256]
    asked = []

    def fits(mb):
        asked.append(mb)
        return mb <= 40

    assert largest_fitting(sizes, fits) == 32
    assert len(asked) <= 4
    assert largest_fitting(sizes, lambda mb: False) is None
    assert largest_fitting(sizes, lambda mb: True) == 256


def test_overrides_are_recipe_keys():
    text = overrides(dict(batch=256, micro_batch=64, key_chunks=8, precision="bf16", checkpointing=True,
                          channels_last=False))
    assert text.split() == ["train.batch_size=256", "train.micro_batch_size=64", "moco.key_chunks=8",
                            "train.precision=bf16", "train.grad_checkpointing=true", "train.channels_last=false"]


def _record(cell: Cell, **figures) -> dict:
    return dict(label=cell.label, group=cell.group, **cell.to_dict(), **figures)


def test_targets_compare_the_named_cells():
    base = dict(arch="resnet18", image_size=128, micro_batch=128, queue_size=4096)
    cells = [
        _record(Cell("naive", **base), peak_mb=2000.0, peak_no_input_mb=1950.0, images_per_s=10.0),
        _record(Cell("lowmem", checkpointing=True, **base), peak_mb=700.0, peak_no_input_mb=650.0),
        _record(Cell("lowmem", checkpointing=False, **base), peak_mb=1000.0, images_per_s=9.5),
        _record(Cell("lowmem", checkpointing=True, batch=256, **base), peak_mb=760.0, peak_no_input_mb=660.0),
    ]
    results = {t["name"].split(":")[0]: t for t in check(cells, "cpu")}
    assert results["memory"]["status"] == "PASS" and results["memory"]["value"] == pytest.approx(0.35)
    assert results["speed"]["status"] == "PASS" and results["speed"]["value"] == pytest.approx(0.95)
    assert results["accumulation"]["status"] == "MISS"


def test_derive_adds_slope_and_fraction_of_the_supervised_step():
    base = dict(arch="resnet18", image_size=64, batch=64)
    cells = [_record(Cell("lowmem", micro_batch=16, **base), peak_mb=100.0),
             _record(Cell("lowmem", micro_batch=64, **base), peak_mb=250.0, images_per_s=30.0),
             _record(Cell("supervised", arch="resnet18", image_size=64, micro_batch=64), peak_mb=90.0,
                     images_per_s=40.0)]
    derive(cells)
    assert cells[0]["slope_mb_per_image"] == pytest.approx(150 / 48)
    assert cells[1]["vs_supervised"] == pytest.approx(0.75)
    assert cells[1]["vs_limit"] == pytest.approx(1.0)


def test_quality_report_compares_the_run_with_its_own_init_and_the_naive_step(tmp_path):
    from benchmarks.commands.quality import initial_encoder, main as quality_main
    from lowmem_moco.eval.run import evaluate_run
    from lowmem_moco.config import load_config
    from lowmem_moco.trainer import Trainer

    cfg = load_config(None, [
        "data.source=synthetic", "data.synthetic_size=128", "data.image_size=32", "data.num_workers=0",
        "data.augment=batched", "model.arch=test_resnet", "model.dim=16", "moco.queue_size=64",
        "moco.key_chunks=2", "train.batch_size=32", "train.max_steps=2", "eval.knn_every=0", "eval.knn_k=10",
        f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    init = initial_encoder(cfg).backbone.state_dict()  # "random init" is exactly the run's starting point
    start = trainer.moco.encoder_q.backbone.state_dict()
    assert all(torch.equal(init[k], start[k]) for k in start)
    trainer.fit()

    quality_main([str(tmp_path / "run"), "--linear-epochs", "2", "--out", str(tmp_path / "q")])
    result = json.loads((tmp_path / "q.json").read_text())
    assert [(r["encoder"], r["steps"]) for r in result["rows"]] == \
        [("random init", 0), ("naive", 2), ("lowmem-moco", 2)]
    # The run's row is what `lowmem-moco eval` measures for the run (same backbone, bank and test images).
    evaluated = {mode: evaluate_run(tmp_path / "run", mode, linear_epochs=2) for mode in ("knn", "linear")}
    run_row = result["rows"][2]
    assert run_row["knn_top1"] == round(evaluated["knn"]["top1"], 2)
    assert run_row["linear_top1"] == round(evaluated["linear"]["top1"], 2)
    assert "| lowmem-moco | 2 |" in (tmp_path / "q.md").read_text()

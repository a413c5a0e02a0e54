"""The planner: fake-tensor predictions against real CPU tensors, the search, bad input."""

from __future__ import annotations

import json

import pytest

from lowmem_moco.plan.auto_batch import plan_micro_batch, rule_micro_batch
from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.errors import ConfigError
from lowmem_moco.plan.predict import GiB, PlannedStep, gpu, usable_bytes
from lowmem_moco.plan.search import Planner, micro_batch_candidates, relative_speed, search

TINY = ["model.arch=resnet18", "model.small_image_stem=true", "model.timm_kwargs.channels=[8,16,32,64]",
        "data.image_size=32", "train.batch_size=16", "moco.queue_size=512", "moco.key_chunks=2",
        "data.source=synthetic"]


def tiny(*extra: str):
    return load_config(None, TINY + list(extra))


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: threads only wait for each other


def test_prediction_agrees_with_real_cpu_tensors_and_the_lean_tracker_with_memtracker():
    cfg = tiny()
    planned = PlannedStep(cfg, "bf16", True)
    lean, full = planned.predict(4, lean=True), planned.predict(4, lean=False)
    measured = PlannedStep(cfg, "bf16", True, fake=False).predict(4, lean=False)  # MemTracker's own bookkeeping
    assert lean.method == "fake" and measured.method == "real-cpu"
    assert abs(lean.peak_bytes / measured.peak_bytes - 1) < 0.10
    assert lean.peak_bytes == full.peak_bytes and lean.by_category == full.by_category
    # Lazy views: the input at the peak is one micro-batch of views, in the precision's dtype;
    # views of the whole batch made before the step would be both views of all 16 images.
    assert lean.by_category["inputs"] == 4 * 3 * 32 * 32 * 2
    assert planned.predict(4, whole_batch_views=True).by_category["inputs"] == 2 * 16 * 3 * 32 * 32 * 2


def test_search_picks_the_fastest_fitting_configuration_of_all():
    cfg = tiny("data.image_size=64", "model.small_image_stem=false", "train.batch_size=8")
    every = Planner(cfg, "no")
    peaks = {(c, m): every.predict(c, m).peak_bytes for c in (False, True) for m in micro_batch_candidates(8)}
    assert [peaks[(False, m)] for m in (2, 4, 8)] == sorted(peaks[(False, m)] for m in (2, 4, 8))
    # A budget whose usable part lies between micro-batches 4 and 8 without checkpointing.
    limit = (peaks[(False, 4)] + peaks[(False, 8)]) // 2
    budget = next(b for b in range(limit, 2 * limit + 2**31, 2**16) if usable_bytes(b) >= limit)
    fitting = [k for k, v in peaks.items() if v <= usable_bytes(budget)]
    best = max(fitting, key=lambda k: relative_speed(k[1], k[0]))
    result = search(Planner(cfg, "no"), budget)
    assert (result.choice.checkpointing, result.choice.micro_batch) == best
    assert len(result.tried) < len(peaks)  # the search skips configurations that cannot win
    # train.micro_batch_size=auto keeps the recipe's checkpointing (off) and takes the largest that fits.
    assert plan_micro_batch(cfg, "no", budget) == (4, peaks[(False, 4)])


def test_bad_input_gets_one_line():
    with pytest.raises(ConfigError, match="known GPUs: t4, l4"):
        gpu("v100")
    with pytest.raises(ConfigError, match="does not divide"):
        PlannedStep(tiny(), "no", False).predict(3)
    with pytest.raises(ConfigError, match="below the .* GiB minimum: the parameters"):
        search(Planner(tiny(), "no"), budget_bytes=1000)


def test_cli_json_schema(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {precision: bf16}\n")
    assert main(["plan", str(recipe), *TINY, "--budget-gb", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"peak_bytes", "by_category", "precision", "budget_bytes", "fits", "choice", "tried"}
    assert out["budget_bytes"] == GiB and out["fits"] is True and out["precision"] == "bf16"
    assert out["choice"]["train.micro_batch_size"] == 16  # everything fits in 1 GiB
    assert sum(out["by_category"].values()) == out["peak_bytes"]
    assert main(["plan", str(recipe), *TINY, "--gpu", "k80"]) == 2
    assert "known GPUs" in capsys.readouterr().err


def test_rule_for_auto_micro_batch_without_a_gpu():
    assert rule_micro_batch(256) == 64 and rule_micro_batch(96) == 48 and rule_micro_batch(40) == 40


def test_an_untraceable_model_is_measured_on_real_cpu_tensors(monkeypatch):
    real_predict = PlannedStep.predict

    def refuse_fake(self, micro_batch, lean=True):
        if self.fake:
            raise NotImplementedError("an operator fake tensors cannot run")
        return real_predict(self, micro_batch, lean)

    monkeypatch.setattr(PlannedStep, "predict", refuse_fake)
    planner = Planner(tiny(), "no")
    with pytest.warns(UserWarning, match="cannot trace resnet18"):
        prediction = planner.predict(False, 8)
    # The planner's answer is the real-tensor measurement of the same step, not a placeholder.
    measured = PlannedStep(tiny(), "no", False, fake=False).predict(8)
    assert prediction.method == "real-cpu" and prediction.peak_bytes == measured.peak_bytes


def test_config_accepts_auto_micro_batch_and_nothing_else_as_a_word():
    assert load_config(None, ["train.micro_batch_size=auto"]).train.micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="train.micro_batch_size must be an integer, null or auto"):
        load_config(None, ["train.micro_batch_size=big"])


def test_auto_on_a_gpu_plans_on_cuda_rules_for_that_card(monkeypatch):
    import torch

    from lowmem_moco.plan import auto_batch

    cfg = tiny("train.micro_batch_size=auto")
    cards = []
    real_planner = auto_batch.Planner
    monkeypatch.setattr(auto_batch, "Planner", lambda *args: cards.append(args[2]) or real_planner(*args))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * GiB, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    chosen, how = auto_batch.choose_micro_batch(cfg, torch.device("cuda"), "fp16")
    assert chosen == 16 and how.startswith("planner:") and "Tesla T4" in how  # the whole batch fits 4 GiB
    assert cards[0].capability == (7, 5)  # fake CUDA as that card: fp16 with loss scaling, its kernels

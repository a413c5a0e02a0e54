"""`lowmem-moco eval` and `export` on a finished run."""

import json
import shutil

import pytest
import timm
import torch

from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.trainer import Trainer

TINY = ["data.source=synthetic", "data.synthetic_size=128", "data.image_size=32", "data.num_workers=0",
        "model.arch=test_resnet", "model.dim=16", "moco.queue_size=64", "moco.key_chunks=2",
        "train.batch_size=32", "train.epochs=1", "train.max_steps=2", "eval.knn_every=1", "eval.knn_k=10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(load_config(None, [*TINY, f"output_dir={out}"])).fit()
    return out


def test_eval_knn_and_linear_append_results_and_reuse_cached_features(run_dir, capsys):
    assert main(["eval", "knn", str(run_dir)]) == 0
    assert main(["eval", "linear", str(run_dir), "--epochs", "5"]) == 0
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records] == ["knn", "linear"]
    assert all("top5" in r and r["step"] == 2 for r in records)
    # The same weights, bank (every training image) and test images as the monitor's last reading.
    monitor = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert records[0]["top1"] == pytest.approx(monitor["knn_top1"], abs=1e-9)
    assert len(list((run_dir / "features").iterdir())) == 2  # train and val, computed once
    assert "top-1" in capsys.readouterr().out


def test_head_features_and_the_paper_protocol_are_options(run_dir, tmp_path, capsys):
    before = len(list((run_dir / "features").iterdir()))
    assert main(["eval", "knn", str(run_dir), "--head"]) == 0
    assert main(["eval", "linear", str(run_dir), "--protocol", "paper", "--epochs", "2"]) == 0
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()][-2:]
    assert records[0]["features"] == "head" and records[1]["protocol"] == "paper"
    assert len(list((run_dir / "features").iterdir())) == before + 2  # head features cached apart

    # A run folder holding only the exported backbone: the same backbone kNN, no head.
    exported = tmp_path / "exported"
    exported.mkdir()
    for name in ("config.yaml", "backbone.safetensors", "backbone.json"):
        shutil.copy(run_dir / name, exported / name)
    assert main(["eval", "knn", str(exported)]) == 0
    from_checkpoint = next(json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()
                           if json.loads(line)["mode"] == "knn")
    from_export = json.loads((exported / "eval.jsonl").read_text())
    assert (from_export["top1"], from_export["top5"], from_export["step"]) == \
        (from_checkpoint["top1"], from_checkpoint["top5"], from_checkpoint["step"])
    capsys.readouterr()
    assert main(["eval", "knn", str(exported), "--head"]) == 2
    assert "drop --head" in capsys.readouterr().err


def test_export_writes_a_timm_loadable_backbone(run_dir, tmp_path):
    out = tmp_path / "b.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out)))
    reference = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(run_dir / "backbone.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


def test_eval_of_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path)]) == 2
    assert "is not a lowmem-moco run" in capsys.readouterr().err

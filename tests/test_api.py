"""The Python entry point notebooks use: lowmem_moco.train(recipe, overrides) -> the run's folder."""

from __future__ import annotations

import yaml
from accelerate import notebook_launcher

import lowmem_moco
from lowmem_moco.checkpoint import list_checkpoints

TINY = {"data.source": "synthetic", "data.synthetic_size": 64, "data.image_size": 32, "data.num_workers": 0,
        "model.arch": "test_resnet", "model.dim": 16, "moco.queue_size": 64, "moco.key_chunks": 2,
        "train.batch_size": 32, "train.micro_batch_size": 16, "train.epochs": 1, "eval.knn_every": 0}


def test_train_takes_a_dict_of_dotted_keys_and_returns_the_run_folder(tmp_path):
    out = tmp_path / "run"
    assert lowmem_moco.train("recipes/demo.yaml", {**TINY, "output_dir": str(out), "train.max_steps": 1}) == out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 1 and saved["data"]["synthetic_size"] == 64  # the dict's values
    assert saved["moco"]["temperature"] == 0.1  # the recipe's, under the overrides
    assert [p.name for p in list_checkpoints(out)] == ["step-000000001.safetensors"]


def test_train_runs_under_accelerates_notebook_launcher(tmp_path):
    """The Accelerator is created inside lowmem_moco.train, as notebook_launcher requires."""
    out = tmp_path / "run"
    notebook_launcher(lowmem_moco.train, args=(None, {**TINY, "output_dir": str(out)}), num_processes=1)
    assert [p.name for p in list_checkpoints(out)] == ["step-000000002.safetensors"]
    assert (out / "backbone.safetensors").is_file()  # the run finished and exported

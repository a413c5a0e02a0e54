"""What a run decides and checks when it starts: each decision made once, every check that needs
no data made before any data is read, the caller's config left as validated, and checkpoints
that carry the backbone's plan (old ones still resume)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import lowmem_moco.backbones as backbones_module
import lowmem_moco.trainer as train_module
from lowmem_moco.checkpoint import list_checkpoints, read_meta
from lowmem_moco.config import load_config
from lowmem_moco.errors import CheckpointError, ConfigError, UserError
from lowmem_moco.trainer import Trainer

TINY = [
    "data.source=synthetic", "data.synthetic_size=64", "data.image_size=32", "data.num_workers=0",
    "model.arch=test_resnet", "model.dim=16", "moco.queue_size=64", "moco.key_chunks=2",
    "train.batch_size=32", "train.micro_batch_size=16", "train.epochs=1", "train.lr=0.05",
    "train.checkpoint_every=1", "eval.knn_every=0",
]


def tiny(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", *extra])


def forbid(monkeypatch, name: str):
    """Make train.<name> fail if called: the check under test must have stopped the run before."""
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran before the configuration was rejected")
    monkeypatch.setattr(train_module, name, called)


def test_a_micro_batch_that_does_not_split_across_processes_fails_before_the_data_is_read(tmp_path, monkeypatch):
    """Catches validate_for_processes running after build_datasets (a whole data set read, or
    downloaded, for a config that was never going to run)."""
    forbid(monkeypatch, "build_datasets")
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        Trainer(tiny(tmp_path, "train.batch_size=32", "train.micro_batch_size=12"))


def test_an_unknown_backbone_fails_before_the_data_is_read(tmp_path, monkeypatch):
    forbid(monkeypatch, "build_datasets")
    with pytest.raises(ConfigError, match="resnet_18"):
        Trainer(tiny(tmp_path, "model.arch=resnet_18"))


def test_fewer_images_than_one_batch_fails_before_the_pipeline_builds_a_cache(tmp_path, monkeypatch):
    """Catches the check made on the pipeline's length only, after a decoded cache was built."""
    forbid(monkeypatch, "build_pipeline")
    with pytest.raises(UserError) as err:
        Trainer(tiny(tmp_path, "data.synthetic_size=20"))
    assert all(fact in str(err.value) for fact in ("fewer than one batch", "train.batch_size"))


def test_the_callers_config_is_not_changed_and_the_run_records_its_micro_batch(tmp_path):
    cfg = tiny(tmp_path, "train.micro_batch_size=auto")
    trainer = Trainer(cfg)
    assert cfg.train.micro_batch_size == "auto"  # the caller's object, as validated
    assert trainer.settings.micro_batch == 32 and "rule" in trainer.settings.micro_batch_how  # CPU rule
    assert trainer.step_fn.micro_batch == 32
    trainer.fit()
    saved = read_meta(list_checkpoints(tmp_path)[-1])
    assert saved["config"]["train"]["micro_batch_size"] == 32


def test_the_backbone_is_planned_once_and_the_resume_checkpoint_read_once(tmp_path, monkeypatch):
    Trainer(tiny(tmp_path, "train.max_steps=1")).fit()
    plans, reads = [], []
    real_plan, real_load = backbones_module.plan_backbone, train_module.load_latest
    monkeypatch.setattr(backbones_module, "plan_backbone", lambda *a, **k: plans.append(a) or real_plan(*a, **k))
    monkeypatch.setattr(train_module, "load_latest", lambda *a: reads.append(a) or real_load(*a))
    trainer = Trainer(tiny(tmp_path, "train.micro_batch_size=auto"))  # auto reads the checkpoint's micro-batch
    trainer.fit()
    assert trainer.step == 2 and trainer.settings.micro_batch == 16  # resumed, the saved micro-batch kept
    assert len(plans) == 1 and len(reads) == 1  # resume, compatibility check and export reuse them


def test_checkpoints_and_exports_store_the_plan_the_encoder_holds(tmp_path):
    trainer = Trainer(tiny(tmp_path, "train.max_steps=1"))
    trainer.fit()
    plan = trainer.moco.encoder_q.plan.to_dict()
    assert read_meta(list_checkpoints(tmp_path)[-1])["backbone"] == plan
    exported = json.loads((tmp_path / "backbone.json").read_text())
    assert {k: exported[k] for k in plan} == plan


def rewrite_meta(path, change) -> None:
    """Rewrite a checkpoint's JSON meta (the tensors, and so their checksum, unchanged)."""
    tensors, meta = load_file(path), read_meta(path)
    change(meta)
    path.write_bytes(st_save(tensors, metadata={"lowmem_moco": json.dumps(meta)}))


def test_a_format_1_checkpoint_without_the_plan_still_resumes(tmp_path):
    Trainer(tiny(tmp_path, "train.max_steps=1")).fit()
    [path] = list_checkpoints(tmp_path)

    def as_format_1(meta):
        del meta["backbone"]
        meta["format_version"] = 1
    rewrite_meta(path, as_format_1)
    trainer = Trainer(tiny(tmp_path))
    assert trainer.step == 1 and trainer.resumed_from == path


def test_the_compatibility_check_reads_the_stored_plan_not_the_config(tmp_path):
    """A checkpoint whose stored backbone differs from what its config would build is refused:
    the check compares the plan the run stored, not one worked out again from the config."""
    Trainer(tiny(tmp_path, "train.max_steps=1")).fit()
    [path] = list_checkpoints(tmp_path)

    def other_backbone(meta):
        meta["backbone"]["timm_kwargs"]["drop_rate"] = 0.5
    rewrite_meta(path, other_backbone)
    with pytest.raises(CheckpointError, match="drop_rate"):
        Trainer(tiny(tmp_path))


def test_resume_writes_nothing_of_its_own_into_the_model_before_the_check(tmp_path):
    """The restore loads the saved weights whole: the resumed query encoder equals the saved one."""
    Trainer(tiny(tmp_path, "train.max_steps=1")).fit()
    [path] = list_checkpoints(tmp_path)
    saved = {k[len("model."):]: v for k, v in load_file(path).items() if k.startswith("model.")}
    resumed = Trainer(tiny(tmp_path)).moco.state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in saved.items()) and saved.keys() == resumed.keys()

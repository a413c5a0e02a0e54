"""Whole runs on the CPU: synthetic and folder data, exact resume, export through timm, CLI."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from lowmem_moco.backbones import load_exported_backbone, make_small_image_stem
from lowmem_moco.checkpoint import list_checkpoints, read_checkpoint
from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.errors import CheckpointError, UserError
from lowmem_moco.trainer import Trainer
from support import REPO, missing, raises_naming, read_jsonl

TINY = [
    "data.source=synthetic", "data.synthetic_size=192", "data.image_size=32", "data.num_workers=0",
    "model.arch=test_resnet", "model.dim=16", "moco.queue_size=96", "moco.key_chunks=4", "moco.momentum=0.9",
    "train.batch_size=32", "train.micro_batch_size=16", "train.epochs=2", "train.lr=0.05",
    "train.log_every=2", "train.checkpoint_every=4", "eval.knn_every=1", "eval.knn_k=10",
]


def run(out, *extra):
    return Trainer(load_config(None, [*TINY, f"output_dir={out}", *extra])).fit()


def metrics(out):
    drop = {"images_per_sec", "peak_mem_mb"}  # timings differ between runs
    return [{k: v for k, v in record.items() if k not in drop} for record in read_jsonl(out / "metrics.jsonl")]


def final_state(out):
    tensors, meta = read_checkpoint(list_checkpoints(out)[-1])
    return tensors, meta["step"]


def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(whole)
    run(parts, "train.max_steps=3")  # stops mid-epoch, between two periodic checkpoints
    run(parts, "train.max_steps=7")  # resumes from step 3, stops again mid-epoch 2
    run(parts)

    (a, step_a), (b, step_b) = final_state(whole), final_state(parts)
    assert step_a == step_b == 12
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics(whole) == metrics(parts)
    kinds = [r["kind"] for r in metrics(whole)]
    assert kinds.count("epoch") == 2 and kinds[0] == "eval"
    assert all({"epoch", "step", "loss", "lr"} <= r.keys() for r in metrics(whole) if r["kind"] != "eval")
    assert (parts / "config.yaml").exists() and (parts / "backbone.safetensors").exists()


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run(tmp_path, "train.max_steps=1")
    with pytest.raises(CheckpointError, match="model.dim=16 but the config says 32"):
        run(tmp_path, "model.dim=32")
    with pytest.raises(CheckpointError, match=r"built with \{\} but this config builds it with \{'zero_init_last': False\}"):
        run(tmp_path, "model.resnet_init=torchvision")


def test_a_run_resumes_when_other_keys_build_the_same_backbone(tmp_path):
    # Recipes used to write torchvision's init as a timm kwarg; today they say model.resnet_init.
    run(tmp_path, "train.max_steps=1", "model.timm_kwargs.zero_init_last=false")
    last = run(tmp_path, "train.max_steps=2", "model.resnet_init=torchvision")
    assert last["step"] == 2


def test_exported_backbone_loads_in_timm_with_identical_features(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "train.max_steps=2",
                                         "eval.knn_every=0"]))
    trainer.fit()
    path = tmp_path / "backbone.safetensors"
    loaded = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    trained = trainer.moco.encoder_q.backbone.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert json.loads(path.with_suffix(".json").read_text())["arch"] == "test_resnet"


def test_small_stem_narrow_backbone_loads_after_rebuilding_the_stem(tmp_path, cifar_folder):
    trainer = Trainer(load_config(None, [
        *TINY, f"output_dir={tmp_path}", "data.source=folder", f"data.root={cifar_folder}",
        "model.arch=resnet18", "model.small_image_stem=true", "model.timm_kwargs.channels=[16,32,64,128]",
        "train.max_steps=2", "eval.knn_every=0"]))
    trainer.fit()
    info = json.loads((tmp_path / "backbone.json").read_text())
    assert info["rebuild_small_image_stem"] and info["timm_kwargs"] == {"channels": [16, 32, 64, 128]}
    model = make_small_image_stem(timm.create_model(info["arch"], num_classes=0, **info["timm_kwargs"]))
    model.load_state_dict(timm.models.load_state_dict(str(tmp_path / "backbone.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trainer.moco.encoder_q.backbone.eval()(x)
        assert torch.equal(model.eval()(x), expected)
        assert torch.equal(load_exported_backbone(tmp_path / "backbone.safetensors").eval()(x), expected)


def test_folder_data_from_real_jpegs_trains_and_measures_knn(tmp_path, cifar_folder):
    folder = ["data.source=folder", f"data.root={cifar_folder}", "train.epochs=1"]
    last = run(tmp_path, *folder)
    assert last["kind"] == "epoch" and torch.isfinite(torch.tensor(last["loss"]))
    # The logged kNN is the saved model's: a trainer resumed from the last checkpoint measures it again.
    resumed = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", *folder]))
    assert resumed.step == last["step"] and resumed.knn() == last["knn_top1"]


def test_knn_monitor_reads_the_configured_features_and_bank(tmp_path, monkeypatch):
    import lowmem_moco.eval.probes as probes_module

    banks = []
    real = probes_module.knn_accuracy
    monkeypatch.setattr(probes_module, "knn_accuracy", lambda bank, *a, **k: banks.append(bank.shape) or real(bank, *a, **k))
    trainer = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "eval.knn_features=head",
                                         "eval.knn_max_train=0"]))
    trainer.knn()
    trainer.cfg.eval.knn_features, trainer.cfg.eval.knn_max_train = "backbone", 50
    trainer.knn()
    width = trainer.moco.encoder_q.head[0].in_features
    assert banks == [(len(trainer.data.train), 16), (50, width)]  # head: 16-d (model.dim); backbone: capped


def test_training_on_every_image_without_a_test_split_turns_the_monitor_off(tmp_path, cifar_folder):
    with pytest.warns(UserWarning, match="kNN monitor is off: data.val_fraction=0"):
        last = run(tmp_path, "data.source=folder", f"data.root={cifar_folder}", "data.val_fraction=0",
                   "train.epochs=1", "train.batch_size=128", "train.micro_batch_size=64", "moco.queue_size=256")
    assert last["kind"] == "epoch" and "knn_top1" not in last and last["step"] == 400 // 128


def test_cli_prints_one_clear_line_for_user_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found" in err and "Traceback" not in err
    assert main(["train", str(REPO / "recipes/demo.yaml"), "model.arch=resnet_18"]) == 2
    assert missing(capsys.readouterr().err, "'resnet_18'", "resnet18") == []  # the typo and the close name


@pytest.mark.slow
def test_accelerate_launch_runs_the_trainer_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "-m", "lowmem_moco", "train",
           str(REPO / "recipes/demo.yaml"), *TINY, "model.small_image_stem=false", "model.timm_kwargs=null",
           "train.epochs=1", "eval.knn_every=0", f"output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "backbone.safetensors").exists()
    assert "end of epoch 1" in proc.stdout


def test_batched_augmentation_trains_end_to_end_from_the_decoded_cache(tmp_path):
    """Catches a batched epoch that drops batches or logs a loss that is not its steps' (or not finite)."""
    last = run(tmp_path, "data.augment=batched", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
               "train.log_every=1")
    losses = [r["loss"] for r in metrics(tmp_path) if r["kind"] == "step"]
    assert last["kind"] == "epoch" and last["step"] == len(losses) == 192 // 32
    assert torch.isfinite(torch.tensor(losses)).all() and last["loss"] == pytest.approx(sum(losses) / len(losses))
    assert any(p.suffix == ".npy" for p in (tmp_path / "cache").iterdir())


def test_trackers_receive_every_metrics_record_and_missing_packages_are_named(tmp_path, monkeypatch):
    from accelerate.tracking import GeneralTracker

    import lowmem_moco.progress as progress
    import lowmem_moco.trainer as train_module

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.config, self.logged = None, []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    recorder = Recorder()
    monkeypatch.setattr(train_module, "trackers", lambda log_with: [recorder])
    run(tmp_path, "train.epochs=1")
    expected = [(r["step"], {f"{r['kind']}/{k}": v for k, v in r.items()
                             if k not in ("step", "kind") and not isinstance(v, (bool, str))})
                for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert recorder.logged == expected and any("epoch/knn_top1" in values for _, values in expected)
    assert recorder.config["train.batch_size"] == 32 and recorder.config["augment.crop_scale"] == "[0.2, 1.0]"
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    with raises_naming(UserError, "train.log_with=tensorboard", "pip install tensorboard"):
        progress.trackers("tensorboard")


def test_auto_micro_batch_is_recorded_and_a_resumed_run_keeps_the_first_choice(tmp_path):
    import yaml

    out = tmp_path / "run"
    run(out, "train.max_steps=4")  # micro-batch 16, checkpoint at step 4
    run(out, "train.micro_batch_size=auto")  # resumes: keeps 16, not the CPU rule's 32
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["micro_batch_size"] == 16
    epochs = [r for r in metrics(out) if r["kind"] == "epoch"]
    assert [r["micro_batch_size"] for r in epochs] == [16, 16] and all(r["micro_batch_auto"] for r in epochs)
    fresh = tmp_path / "fresh"
    run(fresh, "train.micro_batch_size=auto", "train.max_steps=2")  # a CPU: the rule
    assert yaml.safe_load((fresh / "config.yaml").read_text())["train"]["micro_batch_size"] == 32

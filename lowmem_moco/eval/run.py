"""Evaluate and export a run: `lowmem-moco eval knn|linear RUN_DIR`, `lowmem-moco export RUN_DIR`.

The backbone comes from the run's newest intact checkpoint (or its exported backbone when
the checkpoints are gone). Features (centre crop, no augmentation) are computed once per
(checkpoint step, backbone or head, data, split, size) and cached in RUN_DIR/features/, so
trying probe settings costs seconds. The paper's linear protocol (`--protocol paper`:
augmented crops, SGD lr 30) runs the backbone every epoch instead. Results are printed and
appended to RUN_DIR/eval.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from ..backbones import Encoder, encoder_from_config, load_exported_backbone
from ..checkpoint import export_backbone, load_latest, model_state, saved_backbone
from ..config import Config, config_from_dict, load_config, read_recipe
from ..data.augment.per_image import linear_train_transform
from ..data.sources.images import DataSplits
from ..data.sources.registry import build_datasets
from ..data.two_views import eval_loader
from ..errors import UserError
from ..files import atomic_write_bytes
from ..timm_args import BackbonePlan
from .probes import extract_features, knn_accuracy, linear_probe, linear_probe_augmented


class LoadedRun(NamedTuple):
    cfg: Config  # the run's config with the overrides
    model: torch.nn.Module  # the backbone, or the Encoder (backbone + head) when asked for the head
    step: int  # the training step of those weights
    plan: BackbonePlan  # how the backbone was built, as the run stored it


def load_run(run_dir: str | Path, overrides: list[str] = (), head: bool | None = False) -> LoadedRun:
    """A run's newest weights: the Encoder when `head` (None: as the run's eval.knn_features says),
    else its backbone; from the newest intact checkpoint, else from the exported backbone."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a lowmem-moco run (no config.yaml); give the output_dir of a training run")
    cfg = load_config(None, overrides, base=config_from_dict(read_recipe(run_dir / "config.yaml")))
    asked = head
    if head is None:
        head = cfg.eval.knn_features == "head"
    found = load_latest(run_dir)
    if found is not None:
        tensors, meta, _ = found
        encoder = encoder_from_config(cfg, saved_backbone(meta))  # built as the run built it
        encoder.load_state_dict(model_state(tensors, "encoder_q"))
        return LoadedRun(cfg, encoder if head else encoder.backbone, meta["step"], encoder.plan)
    exported = run_dir / "backbone.safetensors"
    if not exported.is_file():
        raise UserError(f"{run_dir} has neither checkpoints nor backbone.safetensors; train first")
    if head and asked:
        raise UserError(f"{run_dir} has no checkpoint, and the exported backbone has no head; "
                        f"evaluate backbone features (drop --head)")
    if head:
        warnings.warn(f"{run_dir} has no checkpoint, so no head (eval.knn_features=head): using backbone features")
    info = json.loads(exported.with_suffix(".json").read_text())
    return LoadedRun(cfg, load_exported_backbone(exported), info.get("step", -1), BackbonePlan.from_dict(info))


def _probe_loader(cfg: Config, images, transform=None, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return eval_loader(cfg, images, 256, transform=transform, shuffle=shuffle, seed=cfg.train.seed)


def _features(cfg: Config, model, images, split: str, step: int, cache: Path, device) -> tuple:
    """L2-normalised centre-crop features of `images`, cached per weights, data and split."""
    kind = type(model).__name__  # an Encoder (backbone + head) or the backbone itself
    key = json.dumps([step, kind, cfg.data.source, cfg.data.root, cfg.data.train_dir, cfg.data.val_dir,
                      cfg.data.val_fraction, cfg.data.image_size, cfg.augment.mean, cfg.augment.std, split,
                      len(images)])
    path = cache / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return saved["features"], saved["labels"]
    feats, labels = extract_features(model.to(device), _probe_loader(cfg, images), device)
    cache.mkdir(parents=True, exist_ok=True)
    # Atomic: an interrupted write never leaves a truncated cache behind.
    atomic_write_bytes(path, st_save({"features": feats, "labels": labels}))
    return feats, labels


def probe(cfg: Config, model, data: DataSplits, mode: str, step: int, cache: Path, device,
          linear_epochs: int = 100, protocol: str = "cached") -> tuple[dict, dict]:
    """(result, settings) of `mode` (knn | linear) for `model` on the train/val split of `data`.

    The kNN and the cached linear probe use centre-crop features cached in `cache`; the
    `paper` linear protocol augments every epoch and so runs the backbone each time.
    """
    classes = len(data.classes)
    if mode == "linear" and protocol == "paper":
        result = linear_probe_augmented(model.to(device), _probe_loader(cfg, data.train, linear_train_transform(
            cfg.data.image_size, cfg.augment.mean, cfg.augment.std), shuffle=True), _probe_loader(cfg, data.val), classes, epochs=linear_epochs,
            device=device, seed=cfg.train.seed)
        return result, {"epochs": linear_epochs, "protocol": "paper"}
    train_f, train_y = _features(cfg, model, data.train, "train", step, cache, device)
    val_f, val_y = _features(cfg, model, data.val, "val", step, cache, device)
    if mode == "knn":
        result = knn_accuracy(train_f.to(device), train_y.to(device), val_f.to(device), val_y.to(device),
                              classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
        return result, {"k": cfg.eval.knn_k, "t": cfg.eval.knn_t}
    return linear_probe(train_f, train_y, val_f, val_y, classes, epochs=linear_epochs, device=device), \
        {"epochs": linear_epochs, "protocol": "cached"}


def evaluate_run(run_dir: str | Path, mode: str, overrides: list[str] = (), linear_epochs: int = 100,
                 protocol: str = "cached", head: bool | None = None, console: Console | None = None) -> dict:
    """`head`: probe the head's output; None: kNN as the run's eval.knn_features says, linear on the backbone."""
    console = console or Console(highlight=False, soft_wrap=True)
    run_dir = Path(run_dir)
    cfg, model, step, _ = load_run(run_dir, overrides, head if head is not None or mode == "knn" else False)
    head = isinstance(model, Encoder)  # what load_run chose
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datasets(cfg.data)
    if data.val is None:
        raise UserError(f"{run_dir} trained on every image (data.val_fraction=0) and the data has no test split; "
                        f"point data.val_dir=... at labelled test images, or hold some out with data.val_fraction=0.1")
    started = time.perf_counter()
    result, settings = probe(cfg, model, data, mode, step, run_dir / "features", device, linear_epochs, protocol)
    train_n, val_n = len(data.train), len(data.val)
    record = {"mode": mode, "features": "head" if head else "backbone", "step": step, "arch": cfg.model.arch,
              "source": cfg.data.source,
              "train_images": train_n, "val_images": val_n, **settings, **result,
              "seconds": round(time.perf_counter() - started, 1)}
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    console.print(f"{mode} on {cfg.data.source} ({val_n} val images, step {step}): "
                  f"top-1 {result['top1']:.2f}%{top5}")
    return record


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    cfg, backbone, step, plan = load_run(run_dir)
    return export_backbone(backbone, plan, Path(out) if out else Path(run_dir) / "backbone.safetensors", cfg, step)

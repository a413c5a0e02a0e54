"""Evaluate and export a run: `lowmem-moco eval knn|linear RUN_DIR`, `lowmem-moco export RUN_DIR`.

The backbone comes from the run's newest intact checkpoint (or its exported backbone when
the checkpoints are gone). Features (centre crop, no augmentation) are computed once per
(checkpoint step, data, split, size) and cached in RUN_DIR/features/, so trying probe
settings costs seconds. Results are printed and appended to RUN_DIR/eval.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from .backbones import build_encoder
from .checkpoint import export_backbone, load_latest
from .config import Config, config_from_dict, load_config, read_recipe
from .data import EvalImages, build_datasets
from .errors import UserError
from .evaluate import extract_features, knn_accuracy, linear_probe


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Config, torch.nn.Module, int]:
    """(config with overrides, backbone with the run's weights, training step of those weights)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a lowmem-moco run (no config.yaml); give the output_dir of a training run")
    cfg = load_config(None, overrides, base=config_from_dict(read_recipe(run_dir / "config.yaml")))
    m = cfg.model
    backbone = build_encoder(m.arch, cfg.data.image_size, m.small_image_stem, m.dim, m.head_hidden_dim).backbone
    found = load_latest(run_dir)
    if found is not None:
        tensors, meta, _ = found
        prefix = "model.encoder_q.backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return cfg, backbone, meta["step"]
    exported = run_dir / "backbone.safetensors"
    if not exported.is_file():
        raise UserError(f"{run_dir} has neither checkpoints nor backbone.safetensors; train first")
    backbone.load_state_dict(load_file(exported))
    return cfg, backbone, json.loads(exported.with_suffix(".json").read_text()).get("step", -1)


def _features(cfg: Config, backbone, images, split: str, step: int, cache: Path, device) -> tuple:
    key = json.dumps([step, cfg.data.source, cfg.data.root, cfg.data.train_dir, cfg.data.val_dir,
                      cfg.data.val_fraction, cfg.data.image_size, split, len(images)])
    path = cache / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return saved["features"], saved["labels"]
    loader = torch.utils.data.DataLoader(EvalImages(images, cfg.data.image_size), batch_size=256,
                                         num_workers=cfg.data.workers)
    feats, labels = extract_features(backbone.to(device), loader, device)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats, "labels": labels}, str(path))
    return feats, labels


def evaluate_run(run_dir: str | Path, mode: str, overrides: list[str] = (), linear_epochs: int = 100,
                 console: Console | None = None) -> dict:
    console = console or Console(highlight=False, soft_wrap=True)
    run_dir = Path(run_dir)
    cfg, backbone, step = load_run(run_dir, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datasets(cfg.data)
    started = time.perf_counter()
    train_f, train_y = _features(cfg, backbone, data.train, "train", step, run_dir / "features", device)
    val_f, val_y = _features(cfg, backbone, data.val, "val", step, run_dir / "features", device)
    classes = len(data.classes)
    if mode == "knn":
        result = knn_accuracy(train_f.to(device), train_y.to(device), val_f.to(device), val_y.to(device),
                              classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
        settings = {"k": cfg.eval.knn_k, "t": cfg.eval.knn_t}
    else:
        result = linear_probe(train_f, train_y, val_f, val_y, classes, epochs=linear_epochs, device=device)
        settings = {"epochs": linear_epochs}
    record = {"mode": mode, "step": step, "arch": cfg.model.arch, "source": cfg.data.source,
              "train_images": len(train_y), "val_images": len(val_y), **settings, **result,
              "seconds": round(time.perf_counter() - started, 1)}
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    console.print(f"{mode} on {cfg.data.source} ({len(val_y)} val images, step {step}): "
                  f"top-1 {result['top1']:.2f}%{top5}")
    return record


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    cfg, backbone, step = load_run(run_dir)
    return export_backbone(backbone, Path(out) if out else Path(run_dir) / "backbone.safetensors", cfg, step)

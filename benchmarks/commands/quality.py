"""Quality of a finished run: its encoder against its random init and the naive step (kNN, linear probe).

Does a run learn, and does the trainer's way of saving memory cost accuracy?

    lowmem-moco train recipes/cifar10_cpu.yaml data.root=DATA output_dir=RUN
    python -m benchmarks quality RUN --out benchmarks/results/quality-cpu

Three encoders, each probed on the run's own held-out split with the kNN classifier (the run's
eval.knn_k / eval.knn_t) and the linear probe of `lowmem-moco eval`:

    random init   the run's encoder before its first step (same seed, same initialisation)
    naive         the suite's baseline step (benchmarks/harness/naive.py: one BatchNorm batch for all
                  keys, no shuffle, no micro-batches) trained for the run's number of steps on
                  the same batches, with the same optimizer, schedule and hyper-parameters
    lowmem-moco   the run's trained encoder (its newest checkpoint)

Writes OUT.json and OUT.md (with the run's per-epoch kNN monitor and time per epoch).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from lowmem_moco.backbones import encoder_from_config
from lowmem_moco.config import Config
from lowmem_moco.data.sources.images import DataSplits
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.engine.moco import momentum_at
from lowmem_moco.data.pipeline import build_pipeline
from lowmem_moco.engine.views import whole
from lowmem_moco.eval.run import load_run, probe
from lowmem_moco.optim import build_optimizer, lr_at

from ..harness.cli import parser
from ..harness.naive import NaiveMoCo
from ..harness.results import RESULTS, markdown_table, write_results


def initial_encoder(cfg: Config) -> torch.nn.Module:
    """The query encoder exactly as the trainer initialises it (it seeds right before the model)."""
    set_seed(cfg.train.seed)
    return encoder_from_config(cfg)


def train_naive(cfg: Config, data: DataSplits, steps: int, device: torch.device, log_every: int = 50) -> torch.nn.Module:
    """`steps` optimizer steps of the naive baseline on the trainer's batches and schedule."""
    t = cfg.train
    pipeline = build_pipeline(data.train, cfg, device)
    encoder = initial_encoder(cfg).to(device)
    optimizer = build_optimizer(encoder.parameters(), cfg)
    naive = NaiveMoCo(encoder, optimizer, cfg.moco.queue_size, cfg.model.dim, cfg.moco.temperature,
                      cfg.moco.momentum, device)
    steps_per_epoch = len(pipeline) // t.batch_size
    total = steps_per_epoch * t.epochs
    step, started = 0, time.perf_counter()
    while step < steps:
        for view_q, view_k, _ in pipeline.epoch(step // steps_per_epoch, step % steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, t)
            naive.momentum = momentum_at(step, total, cfg.moco.momentum, cfg.moco.momentum_schedule)
            loss = naive(whole(view_q), whole(view_k))  # the baseline takes whole batches
            step += 1
            if step % log_every == 0 or step == steps:
                rate = step * t.batch_size / (time.perf_counter() - started)
                print(f"naive: step {step}/{steps} | loss {loss:.4f} | {rate:.1f} img/s", flush=True)
            if step >= steps:
                break
    return encoder.backbone


def monitor_curve(run_dir: Path) -> list[dict]:
    """The run's per-epoch records (kNN monitor where measured, images/s)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if r.get("kind") in ("eval", "epoch")]


def report(run_dir: Path, linear_epochs: int) -> dict:
    cfg, trained, step, _ = load_run(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datasets(cfg.data)
    started = time.perf_counter()
    naive = train_naive(cfg, data, step, device)
    naive_seconds = time.perf_counter() - started
    encoders = {"random init": (initial_encoder(cfg).backbone, 0, run_dir / "features/random-init"),
                "naive": (naive, step, run_dir / "features/naive"),
                "lowmem-moco": (trained, step, run_dir / "features")}
    rows = []
    for name, (backbone, at_step, cache) in encoders.items():
        row = {"encoder": name, "steps": at_step}
        for mode in ("knn", "linear"):
            result, _ = probe(cfg, backbone, data, mode, at_step, cache, device, linear_epochs)
            row.update({f"{mode}_{k}": round(v, 2) for k, v in result.items()})
        print(row, flush=True)
        rows.append(row)
    return {"run": str(run_dir), "device": _device_name(device), "source": cfg.data.source, "root": cfg.data.root,
            "arch": cfg.model.arch, "timm_kwargs": cfg.model.timm_kwargs, "image_size": cfg.data.image_size,
            "train_images": len(data.train), "val_images": len(data.val), "knn": {"k": cfg.eval.knn_k, "t": cfg.eval.knn_t},
            "linear_epochs": linear_epochs, "naive_train_seconds": round(naive_seconds, 1),
            "rows": rows, "monitor": monitor_curve(run_dir)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    knn = result["knn"]
    probes = [[r["encoder"], r["steps"], *(r.get(f"{mode}_{k}", "-") for mode in ("knn", "linear") for k in ("top1", "top5"))]
              for r in result["rows"]]
    monitor = [[r.get("epoch", 0), r.get("step", 0), f"{r['knn_top1']:.2f}" if "knn_top1" in r else "-",
                f"{r['loss']:.4f}" if "loss" in r else "-",
                f"{r['images_per_sec']:.0f}" if "images_per_sec" in r else "-"] for r in result["monitor"]]
    return "\n".join([
        f"# Quality: {result['arch']} on {result['source']} ({result['root']}), {result['image_size']} px", "",
        f"{result['device']}; {result['train_images']} training / {result['val_images']} held-out images; "
        f"kNN k={knn['k']} t={knn['t']} on the training set's features; linear probe "
        f"{result['linear_epochs']} epochs on cached features.", "",
        *markdown_table(["encoder", "steps", "kNN top-1", "kNN top-5", "linear top-1", "linear top-5"], probes,
                        "lrrrrr"),
        "", f"Naive baseline training: {result['naive_train_seconds']:.0f} s.", "",
        "Run's kNN monitor (subset of the training set as the bank):", "",
        *markdown_table(["epoch", "step", "kNN top-1", "mean loss", "images/s"], monitor, "rrrrr")]) + "\n"


def main(argv: list[str]) -> int:
    p = parser("quality", __doc__)
    p.add_argument("run_dir", type=Path, help="output_dir of a finished training run")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS / "quality",
                   help="path prefix of the JSON and Markdown reports")
    args = p.parse_args(argv)
    result = report(args.run_dir, args.linear_epochs)
    text = markdown(result)
    write_results(args.out, result, text)
    print(text)
    return 0

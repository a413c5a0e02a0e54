"""The 1024-px recipe's training speed on this machine, and what an epoch of 10,000 images costs.

    python -m benchmarks highres                                  # recipes/highres_resnet50.yaml, batch 8 = 2 x 4
    python -m benchmarks highres --batch 256 --micro-batch 32     # the recipe's own batch (a GPU)

Trains the recipe itself (the trainer, its data pipeline and step; `train.precision=fp16`
falls back to fp32 on a CPU) on generated 1280x1024 / 1024x1280 JPEG photos, for `--steps`
timed steps after one untimed step, and reports the median images/s of the timed steps. The
epoch time for 10,000 images is that rate extrapolated (10,000 / images per second).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from lowmem_moco.config import load_config
from lowmem_moco.trainer import Trainer

from ..harness.cli import parser
from ..harness.images import smooth_photos, write_jpegs
from ..harness.machine import environment
from ..harness.results import REPO_ROOT, RESULTS, command_line, dated, markdown_table, write_results

RECIPE = REPO_ROOT / "recipes" / "highres_resnet50.yaml"
EPOCH_IMAGES = 10_000


def measure(batch: int, micro_batch: int, steps: int, overrides: list[str], work: Path) -> dict:
    photos = write_jpegs(smooth_photos(batch * (steps + 1), block=64), work / "photos")
    run_dir = work / "run"
    cfg = load_config(RECIPE, [f"data.root={photos}", f"output_dir={run_dir}", f"train.batch_size={batch}",
                               f"train.micro_batch_size={micro_batch}", f"train.max_steps={steps + 1}",
                               "moco.key_chunks=2" if batch < 16 else "moco.key_chunks=8",
                               "data.val_fraction=0", "eval.knn_every=0", "train.log_every=1",
                               "train.checkpoint_every=0", *overrides])
    trainer = Trainer(cfg)
    trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in records if r.get("kind") == "step"][1:]  # the first step warms up
    rate = statistics.median(rates)
    return dict(batch=batch, micro_batch=micro_batch, key_chunks=cfg.moco.key_chunks, timed_steps=len(rates),
                images_per_s=rate, seconds_per_step=batch / rate, epoch_hours=EPOCH_IMAGES / rate / 3600,
                precision=trainer.acc.mixed_precision, device=str(trainer.device),
                peak_mem_mb=max(r.get("peak_mem_mb", 0) for r in records), overrides=overrides)


def markdown(result: dict, command: str, env: dict) -> str:
    r = result
    return "\n".join([
        "# The 1024-px recipe's speed", "",
        f"`{command}` on {env.get('device_name') or env.get('cpu') or r['device']} (measured): "
        f"recipes/highres_resnet50.yaml, 1024 px, ResNet-50, precision {r['precision']}, checkpointing, "
        f"batch {r['batch']} = micro-batches of {r['micro_batch']}, {r['key_chunks']} key chunks, generated "
        f"1280x1024 JPEG photos; median of {r['timed_steps']} timed step(s) after one untimed step.", "",
        *markdown_table(["images/s", "s/step", "epoch of 10,000 images (extrapolated)", "peak memory MB"],
                        [[f"{r['images_per_s']:.3f}", f"{r['seconds_per_step']:.1f}", f"{r['epoch_hours']:.1f} h",
                          f"{r['peak_mem_mb']:.0f}"]])]) + "\n"


def main(argv: list[str]) -> int:
    p = parser("highres", __doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one untimed step)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("overrides", nargs="*", help="more key=value overrides of the recipe")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="lowmem-moco-highres-") as work:
        result = measure(args.batch, args.micro_batch, args.steps, args.overrides, Path(work))
    env = environment(device)
    text = markdown(result, command_line("highres", argv), env)
    write_results(dated(f"highres-{device}"), dict(result, environment=env), text, args.out)
    print(text)
    return 0

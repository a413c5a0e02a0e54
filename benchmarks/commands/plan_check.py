"""The planner's fake-tensor prediction against MemTracker's peak on real CPU tensors (within 5 %),
and how far the CPU's rules are from CUDA's.

    python -m benchmarks plan-check            # the grid below; writes results/plan-check-cpu-<date>.{json,md}
    python -m benchmarks plan-check --smoke    # one tiny cell group, nothing written

Every cell of the grid should agree within 5 %; the command exits non-zero when one does not.

Grid: resnet18, resnet50, convnext_atto (two image sizes) and vit_tiny_patch16_224 (224 px);
two micro-batches; checkpointing off and on; precision no and bf16 (CPU autocast). Both sides
run lowmem_moco.plan.predict.PlannedStep: the same modules, micro-batches, key chunks, queue,
optimizer state and input views, once on fake tensors and once on real ones. A third run
predicts each cell on CUDA's rules (fake CUDA tensors under CUDA autocast, as `lowmem-moco plan
--gpu` does) for an A100 (native bf16); the "CUDA - CPU rules" column is its difference from the
CPU-rules prediction: what the CPU's rules miss of a GPU step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lowmem_moco.config import load_config
from lowmem_moco.plan.predict import PlannedStep, gpu

from ..harness.cli import parser
from ..harness.results import RESULTS, command_line, dated, markdown_table, write_results

# Sizes and batches where activations, not the weights, make the peak.
ARCHS = {"resnet18": (96, 160), "resnet50": (96, 160), "convnext_atto": (96, 160), "vit_tiny_patch16_224": (224,)}
SMOKE = {"resnet18": (32,)}
CUDA_RULES_CARD = gpu("a100-40")  # native bf16: both precisions of the grid run as on the CPU


def check(archs: dict = ARCHS, batch: int = 32, micro_batches: tuple = (16, 32), queue_size: int = 4096,
          log=print) -> list[dict]:
    cells = []
    for arch, sizes in archs.items():
        for size in sizes:
            for precision in ("no", "bf16"):
                for ckpt in (False, True):
                    cfg = load_config(None, [f"model.arch={arch}", f"data.image_size={size}",
                                             f"train.batch_size={batch}", f"moco.queue_size={queue_size}",
                                             f"moco.key_chunks={min(4, batch // 2)}", "data.source=synthetic"])
                    fake, real = PlannedStep(cfg, precision, ckpt), PlannedStep(cfg, precision, ckpt, fake=False)
                    on_cuda = PlannedStep(cfg, precision, ckpt, card=CUDA_RULES_CARD)
                    for mb in micro_batches:
                        start = time.perf_counter()
                        planned, measured, cuda_rules = fake.predict(mb), real.predict(mb), on_cuda.predict(mb)
                        cell = dict(arch=arch, image_size=size, precision=precision, checkpointing=ckpt,
                                    micro_batch=mb, batch=batch, planned_bytes=planned.peak_bytes,
                                    measured_bytes=measured.peak_bytes, plan_s=planned.seconds,
                                    cuda_rules_bytes=cuda_rules.peak_bytes,
                                    cuda_minus_cpu_rules=cuda_rules.peak_bytes / planned.peak_bytes - 1,
                                    error=planned.peak_bytes / measured.peak_bytes - 1,
                                    activation_share=planned.by_category.get("activations", 0) / planned.peak_bytes,
                                    wall_s=time.perf_counter() - start)
                        cells.append(cell)
                        log(f"{arch:>22} {size:>4} px {precision:>4} ckpt {'on ' if ckpt else 'off'} mb {mb:>3}: "
                            f"planned {planned.peak_bytes / 2**20:8.1f} MiB, measured "
                            f"{measured.peak_bytes / 2**20:8.1f} MiB, error {cell['error']:+.2%}, CUDA rules "
                            f"{cell['cuda_minus_cpu_rules']:+.2%}, "
                            f"activations {cell['activation_share']:.0%} of the peak")
    return cells


def markdown(cells: list[dict], command: str) -> str:
    worst = max(cells, key=lambda c: abs(c["error"]))
    body = [[c["arch"], c["image_size"], c["precision"], "on" if c["checkpointing"] else "off", c["micro_batch"],
             f"{c['planned_bytes'] / 2**20:.1f}", f"{c['measured_bytes'] / 2**20:.1f}", f"{c['error']:+.2%}",
             f"{c['activation_share']:.0%}", f"{(c['cuda_rules_bytes'] - c['planned_bytes']) / 2**20:+.1f} "
             f"({c['cuda_minus_cpu_rules']:+.2%})"] for c in cells]
    widest = max(cells, key=lambda c: abs(c["cuda_minus_cpu_rules"]))
    return "\n".join([
        "# plan-check: planned (fake tensors) vs measured (real CPU tensors) peak", "",
        f"`{command}` on this machine's CPU; MiB of tensor memory at the step's peak (torch MemTracker). "
        f"Worst cell: {_label(worst)}, error {worst['error']:+.2%}. "
        f"CUDA - CPU rules: the prediction on CUDA's rules (fake CUDA tensors, CUDA autocast, "
        f"{CUDA_RULES_CARD.name}) less the one on the CPU's, in MiB; widest: {_label(widest)}, "
        f"{widest['cuda_minus_cpu_rules']:+.2%}.", "",
        *markdown_table(["arch", "px", "precision", "ckpt", "mb", "planned MiB", "measured MiB", "error",
                         "activations share", "CUDA - CPU rules MiB"], body)]) + "\n"


def _label(c: dict) -> str:
    return (f"{c['arch']} {c['image_size']} px {c['precision']} checkpointing "
            f"{'on' if c['checkpointing'] else 'off'} micro-batch {c['micro_batch']}")


def main(argv: list[str]) -> int:
    p = parser("plan-check", __doc__)
    p.add_argument("--smoke", action="store_true", help="resnet18 at 32 px, batch 4: a minute; writes nothing")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the real steps are small: more threads on a shared CPU only spin
    cells = check(SMOKE, batch=4, micro_batches=(2, 4), queue_size=256) if args.smoke else check()
    worst = max(cells, key=lambda c: abs(c["error"]))
    print(f"worst cell: {_label(worst)}: error {worst['error']:+.2%} "
          f"({'within' if abs(worst['error']) <= 0.05 else 'OVER'} the 5 % target)")
    if not args.smoke:
        command = command_line("plan-check", argv)
        paths = write_results(dated("plan-check-cpu"), dict(command=command, cells=cells, worst=worst),
                              markdown(cells, command), args.out)
        print(f"wrote {paths['json']} and {paths['md']}")
    return 0 if abs(worst["error"]) <= 0.05 else 1

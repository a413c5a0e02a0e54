"""MoCo v3's gradient-cache step against the whole-batch step: peak memory and time of one step.

    python -m benchmarks gradcache                        # ViT-Tiny, 96 px, B 256: micro-batches of 32 vs 256
    python -m benchmarks gradcache --batch 128 --micro-batch 16 --arch vit_small_patch16_224

Both steps are the trainer's own (harness.cells -> lowmem_moco.factory.build_model / build_step,
moco.version=v3, model.dim 256 and the default 4096-wide heads), fp32, on the same random
images. At micro-batch B the v3 step runs without a cache (one forward with autograd); below
it, the cache (lowmem_moco/engine/gradcache.py). Memory: each step in a fresh process, peak
tensor memory by category (on a CPU: PyTorch's MemTracker; on CUDA: max_memory_allocated).
Time: the two steps interleaved in one process after one untimed step each, median of
`--repeats`. The cache runs the query backbone forward twice: the time ratio says what that costs.
"""

from __future__ import annotations

from pathlib import Path

from ..harness.cells import Cell
from ..harness.cli import parser, pick_device, step_options
from ..harness.machine import environment
from ..harness.measure import run_cell, time_together
from ..harness.results import RESULTS, command_line, dated, markdown_table, write_results

GOAL = 0.35  # the cached step's peak memory over the whole-batch step's, at most


def cells(arch: str, size: int, batch: int, micro: int, key_chunks: int) -> tuple[Cell, Cell]:
    """(cached, whole-batch) v3 cells."""
    common = dict(arch=arch, image_size=size, batch=batch, key_chunks=key_chunks, version="v3", timed=False)
    return Cell(micro_batch=micro, **common), Cell(micro_batch=batch, **common)


def markdown(r: dict, command: str, env: dict) -> str:
    rows = [[name, r[name]["micro_batch"], f"{r[name]['peak_mb']:.0f}",
             ", ".join(f"{k} {v:.0f}" for k, v in r[name]["breakdown_mb"].items() if k != "total" and v >= 1),
             f"{r[name]['step_s']:.2f}"] for name in ("cached", "whole")]
    ratio = (f"**memory ratio {r['memory_ratio']:.3f}** (goal at most {GOAL}), "
             f"**time ratio {r['time_ratio']:.2f}** (cached / whole)")
    return "\n".join([
        "# MoCo v3: the gradient-cache step against the whole-batch step", "",
        f"`{command}` on {env.get('device_name') or env.get('cpu')} (measured): {r['arch']}, {r['image_size']} px, "
        f"batch {r['batch']}, {r['key_chunks']} key chunks, fp32, model.dim 256, heads 4096 wide. Peak: "
        f"{r['memory_method']}, one step in a fresh process; time: median of {r['repeats']} interleaved step(s) "
        f"after one untimed step each.", "",
        *markdown_table(["step", "micro-batch", "peak MB", "at the peak (MB)", "s/step"], rows, "lrrlr"), "",
        ratio, ""])


def main(argv: list[str]) -> int:
    p = parser("gradcache", __doc__)
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--key-chunks", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    step_options(p)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cached, whole = cells(args.arch, args.image_size, args.batch, args.micro_batch, args.key_chunks)
    result = dict(arch=args.arch, image_size=args.image_size, batch=args.batch, key_chunks=args.key_chunks,
                  repeats=args.repeats, device=device,
                  memory_method="MemTracker" if device == "cpu" else "torch.cuda.max_memory_allocated")
    for name, cell in (("cached", cached), ("whole", whole)):
        measured = run_cell(cell, device, threads=args.threads)
        if measured.get("error"):
            raise SystemExit(f"{name} step: {measured['error']}")
        result[name] = dict(micro_batch=cell.micro_batch, peak_mb=measured["peak_mb"],
                            breakdown_mb=measured.get("breakdown_mb", {}), loss=measured["loss"])
    timings = time_together([cached, whole], device, warmup=args.warmup or 0, repeats=args.repeats,
                            threads=args.threads)
    for name, timing in zip(("cached", "whole"), timings):
        if timing.get("error"):
            raise SystemExit(f"timing: {timing['error']}")
        result[name].update(step_s=timing["step_s"], step_s_all=timing["step_s_all"])
    result["memory_ratio"] = result["cached"]["peak_mb"] / result["whole"]["peak_mb"]
    result["time_ratio"] = result["cached"]["step_s"] / result["whole"]["step_s"]
    env = environment(device, args.threads)
    text = markdown(result, command_line("gradcache", argv), env)
    write_results(dated(f"gradcache-{device}"), dict(result, environment=env), text, args.out)
    print(text)
    return 0

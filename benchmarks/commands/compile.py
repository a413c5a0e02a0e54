"""train.compile: the step's speed compiled against eager, and the time compiling takes.

    python -m benchmarks compile                                   # resnet18 at 64 px, batch 32, CPU
    python -m benchmarks compile --archs resnet18,resnet50 --image-size 96 --steps 5
    python -m benchmarks compile --device cuda --archs resnet50 --image-size 224 --batch 256 --micro-batch 64

Both steps are the trainer's own (harness.cells.build -> lowmem_moco.factory.build_model / build_step), on the same
random images, with the same seed. The compiled step's first call compiles f_q's backbone
(forward and backward, at the micro-batch) and f_k's (forward, at the key chunk); its compile
time is that first step minus a steady compiled step. Inductor's on-disk cache starts empty
(a fresh TORCHINDUCTOR_CACHE_DIR), so the figure is a first run's; with `--cache-dir` twice,
the second run measures a start that finds its kernels compiled. After the first step the two steps alternate, so that a busy
machine slows both alike; the steady figures are medians.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..harness.cells import Cell, build
from ..harness.cli import parser
from ..harness.results import command_line, dated, markdown_table, write_results


def _timed(step, device: torch.device) -> tuple[float, float]:
    """(seconds, loss) of one step."""
    start = time.perf_counter()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss


def measure(arch: str, image_size: int, batch: int, micro_batch: int, key_chunks: int, steps: int,
            device: torch.device = torch.device("cpu"), cache_dir: str | None = None) -> dict:
    """Seconds per step, eager and compiled, and what compiling cost (inductor's on-disk cache in
    `cache_dir`; None: a new empty folder)."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="lowmem_moco_inductor_")
    base = dict(kind="lowmem", arch=arch, image_size=image_size, micro_batch=micro_batch, batch=batch,
                key_chunks=key_chunks, queue_size=4096)
    eager, compiled = build(Cell(**base), device), build(Cell(**base, compile=True), device)
    # Same seed, same images: the two runs train in lockstep, so their losses compare step by step.
    (first_eager, loss_eager), (first_compiled, loss_compiled) = _timed(eager.step, device), _timed(compiled.step, device)
    times, losses = {"eager": [], "compiled": []}, {"eager": [loss_eager], "compiled": [loss_compiled]}
    for _ in range(steps):
        for mode, workload in (("eager", eager), ("compiled", compiled)):
            seconds, loss = _timed(workload.step, device)
            times[mode].append(seconds)
            losses[mode].append(loss)
    steady = {mode: statistics.median(t) for mode, t in times.items()}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    return dict(arch=arch, image_size=image_size, batch=batch, micro_batch=micro_batch, key_chunks=key_chunks,
                first_eager_s=first_eager, first_compiled_s=first_compiled, eager_s=steady["eager"],
                compiled_s=steady["compiled"], speedup=steady["eager"] / steady["compiled"],
                compile_s=first_compiled - steady["compiled"], graphs=graphs, times=times, losses=losses,
                loss_gap=max(abs(c - e) / abs(e) for e, c in zip(losses["eager"], losses["compiled"])))


def markdown(rows: list[dict], command: str, device: torch.device, cache_dir: str | None = None) -> str:
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} thread(s)")
    lines = [
        f"# train.compile on a {device.type.upper()}: step time compiled and eager, and the compile time", "",
        f"Command: `{command}`", "",
        f"Machine: {machine}; torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}. The trainer's own step (K 4096, fp32); eager and compiled "
        "steps alternate after the first, medians of the steady ones; inductor's cache "
        f"{'in ' + cache_dir if cache_dir else 'empty at the start'}. "
        f"Load average over the last minute at the end: {os.getloadavg()[0]:.1f}.", "",
    ]
    body = [[r["arch"], r["image_size"], f"{r['batch']} / {r['micro_batch']} / {r['key_chunks']}", f"{r['eager_s']:.3f}",
             f"{r['compiled_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['first_compiled_s']:.1f}", f"{r['compile_s']:.1f}",
             r["graphs"], f"{r['loss_gap']:.1e}"] for r in rows]
    lines += markdown_table(["model", "px", "batch / micro / key chunks", "eager step s", "compiled step s", "speed-up",
                             "first compiled step s", "compile s", "graphs compiled", "largest relative loss gap"],
                            body, "lrlrrrrrrr")
    lines += ["", "Every step's seconds and losses (eager, compiled):", ""]
    lines += [f"- {r['arch']}: eager {', '.join(f'{t:.3f}' for t in r['times']['eager'])}; "
              f"compiled {', '.join(f'{t:.3f}' for t in r['times']['compiled'])}; losses eager "
              f"{', '.join(f'{x:.6f}' for x in r['losses']['eager'])}, compiled "
              f"{', '.join(f'{x:.6f}' for x in r['losses']['compiled'])}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = parser("compile", __doc__)
    p.add_argument("--archs", default="resnet18", help="timm model names, comma-separated")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=None, help="default: the batch")
    p.add_argument("--key-chunks", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="steady steps of each kind after the first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps a shared machine's timings steady)")
    p.add_argument("--cache-dir", default=None,
                   help="inductor's cache folder (default: a new empty one); a second run with the same "
                        "folder measures a warm start")
    p.add_argument("--out", type=Path, default=None,
                   help="results path, .md or without suffix (default: benchmarks/results/compile-<device>-<date>)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for arch in [a for a in args.archs.split(",") if a]:
        r = measure(arch, args.image_size, args.batch, args.micro_batch or args.batch, args.key_chunks, args.steps,
                    device, args.cache_dir)
        print(f"{arch}: eager {r['eager_s']:.3f} s, compiled {r['compiled_s']:.3f} s ({r['speedup']:.2f}x), "
              f"compile {r['compile_s']:.1f} s, {r['graphs']} graphs, loss gap {r['loss_gap']:.1e}", flush=True)
        rows.append(r)
    text = markdown(rows, command_line("compile", argv), device, args.cache_dir)
    paths = write_results(args.out or dated(f"compile-{device.type}"), rows, text)
    print(f"wrote {paths['md']}")
    return 0

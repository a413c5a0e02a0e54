"""Command line of the benchmark suite (run from the repository root).

    python -m benchmarks run --quick                                          # CPU grid, < 10 min
    python -m benchmarks run --arch resnet50 --image-size 224 --budget-gb 16  # GPU grid
    python -m benchmarks fit --arch resnet50 --image-size 224 --budget-gb 15  # largest micro-batch
    python -m benchmarks plan-check                                           # planner vs real CPU memory
    python -m benchmarks input-memory                                         # views' share of a step's peak
    python -m benchmarks compile                                              # train.compile: speed-up, compile time
    python -m benchmarks gpu [--smoke]                                        # the GPU machine's one command
    python -m benchmarks caches --image-size 96 --image-size 224              # input img/s by data.cache
    python -m benchmarks highres                                              # the 1024-px recipe's img/s
    python -m benchmarks peers --quick                                        # lightly's MoCo v2 beside ours
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to PyTorch")
    return name


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="memory and throughput over a grid; writes JSON, Markdown and a plot")
    run.add_argument("--quick", action="store_true", help="the CPU grid (ResNet-18, 128 px), every CPU target cell")
    run.add_argument("--arch", default="resnet50", help="timm model name (full grid)")
    run.add_argument("--image-size", type=int, default=224)
    run.add_argument("--micro-batches", type=_ints, default=[32, 64, 128, 256], help="e.g. 32,64,128")
    run.add_argument("--batch", type=int, default=256, help="effective batch of the MoCo cells")
    run.add_argument("--queue-size", type=int, default=65536)
    run.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                     help="no,fp16,bf16 (default: no + the device's fast mixed precision)")
    run.add_argument("--channels-last", choices=["off", "on", "both"], default=None,
                     help="default: both on a GPU, off on a CPU")
    run.add_argument("--no-naive", action="store_true", help="leave out the naive baseline")
    run.add_argument("--budget-gb", type=float, default=None, help="GPU memory cap per cell (OOM cells are marked)")
    _common(run)
    run.add_argument("--data-source", default="synthetic", help="data.source for the data input figure")
    run.add_argument("--data-root", default=None, help="an image folder tree (sets --data-source folder)")
    run.add_argument("--data-workers", type=int, default=None, help="loader workers (default: CPU cores, <= 8)")
    run.add_argument("--no-data", action="store_true", help="skip the data input figure")
    run.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    run.add_argument("--name", default=None, help="file name stem (default: <host>-<date>)")

    fit = sub.add_parser("fit", help="largest micro-batch (and fastest configuration) under a memory budget")
    fit.add_argument("--arch", default="resnet50")
    fit.add_argument("--image-size", type=int, default=224)
    fit.add_argument("--budget-gb", type=float, default=None, help="default: the GPU's memory (or free RAM)")
    fit.add_argument("--margin", type=float, default=0.1, help="safety margin kept free (fraction of the budget)")
    fit.add_argument("--batch", type=int, default=256, help="effective batch (train.batch_size)")
    fit.add_argument("--queue-size", type=int, default=65536)
    fit.add_argument("--key-chunks", type=int, default=8)
    fit.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None)
    fit.add_argument("--small-image-stem", action="store_true")
    _common(fit)
    return p.parse_args(argv)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the memory step, which is never timed (default: 1; --quick: 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (default: PyTorch's, one per core; --quick: 1, which keeps "
                        "timings steady on a shared machine)")


# name -> (module, its entry point taking the remaining arguments); "cell" is internal: one
# measurement in a fresh child process.
COMMANDS = {"cell": (".measure", "cell_main"), "gpu": (".gpu", "main"), "input-memory": (".input_memory", "main"),
            "highres": (".highres", "main"), "caches": (".input_caches", "main"), "compile": (".compile_speed", "main"),
            "peers": (".peers", "main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:  # commands with their own argument parser
        module, function = COMMANDS[argv[0]]
        return getattr(importlib.import_module(module, __package__), function)(argv[1:])
    if argv[:1] == ["plan-check"]:
        from .plan_check import main as plan_check
        return plan_check(smoke="--smoke" in argv, command="python -m benchmarks " + " ".join(argv))
    args = parse(argv)
    command = "python -m benchmarks " + " ".join(argv)
    if args.command == "fit":
        return _fit(args)
    from .suite import RESULTS, default_precisions, full_grid, quick_grid, run_suite, with_references

    device = "cpu" if args.quick else _device(args.device)
    if args.quick:
        cells = quick_grid()
    else:
        layouts = {"off": [False], "on": [True], "both": [False, True]}[
            args.channels_last or ("both" if device == "cuda" else "off")]
        cells = full_grid(args.arch, args.image_size, args.micro_batches, args.batch, args.queue_size,
                          args.precisions or default_precisions(device), layouts, naive=not args.no_naive)
    cells = with_references(cells)
    data_input = None
    if not args.no_data:
        size = cells[0].image_size
        data_input = dict(image_size=size, source="folder" if args.data_root else args.data_source,
                          root=args.data_root, num_workers=args.data_workers, device=device)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    # One thread per cell for --quick: with a CPU shared with other work, several OpenMP threads
    # per process spin at every barrier and the many small ops of a step slow down erratically.
    threads = args.threads or (1 if args.quick else None)
    run_suite(cells, args.out or RESULTS, device, warmup, args.repeats, args.budget_gb, data_input,
              command=command, stem=args.name, threads=threads)
    return 0


def _fit(args) -> int:
    from .fit import default_budget_gb, find_fit

    device = _device(args.device)
    budget = args.budget_gb or default_budget_gb(device)
    print(f"fit: {args.arch} at {args.image_size} px on {device}, budget {budget:.1f} GB "
          f"(keeping {args.margin:.0%} free), effective batch {args.batch}")
    found = find_fit(args.arch, args.image_size, budget, device, args.batch, args.queue_size, args.key_chunks,
                     args.precision, args.margin, args.small_image_stem, args.repeats,
                     warmup=1 if args.warmup is None else args.warmup, threads=args.threads)
    if found["best"] is None:
        print(f"nothing fits: even micro-batch 2 exceeds {found['limit_mb']:.0f} MB; "
              f"try a smaller --image-size or model")
        return 1
    b = found["best"]
    print(f"fastest that fits: micro-batch {b['micro_batch']} ({b['used_mb']:.0f} MB, "
          f"{b['images_per_s'] or 0:.1f} images/s)")
    print(found["overrides"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

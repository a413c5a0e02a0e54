"""Memory and throughput of the MoCo step over a grid, against the naive loop and timm's supervised step.

    python -m benchmarks run --quick                                          # CPU grid, < 10 min
    python -m benchmarks run --arch resnet50 --image-size 224 --budget-gb 16  # GPU grid

Writes benchmarks/results/<host>-<date>.{json,md,png} (benchmarks/harness/suite.py, report.py).
"""

from __future__ import annotations

from pathlib import Path

from ..harness.cli import ints, parser, pick_device, step_options
from ..harness.results import RESULTS, command_line
from ..harness.suite import default_precisions, full_grid, quick_grid, run_suite, with_references


def parse(argv: list[str]):
    run = parser("run", __doc__)
    run.add_argument("--quick", action="store_true", help="the CPU grid (ResNet-18, 128 px), every CPU target cell")
    run.add_argument("--arch", default="resnet50", help="timm model name (full grid)")
    run.add_argument("--image-size", type=int, default=224)
    run.add_argument("--micro-batches", type=ints, default=[32, 64, 128, 256], help="e.g. 32,64,128")
    run.add_argument("--batch", type=int, default=256, help="effective batch of the MoCo cells")
    run.add_argument("--queue-size", type=int, default=65536)
    run.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                     help="no,fp16,bf16 (default: no + the device's fast mixed precision)")
    run.add_argument("--channels-last", choices=["off", "on", "both"], default=None,
                     help="default: both on a GPU, off on a CPU")
    run.add_argument("--no-naive", action="store_true", help="leave out the naive baseline")
    run.add_argument("--budget-gb", type=float, default=None, help="GPU memory cap per cell (OOM cells are marked)")
    step_options(run)
    run.add_argument("--data-source", default="synthetic", help="data.source for the data input figure")
    run.add_argument("--data-root", default=None, help="an image folder tree (sets --data-source folder)")
    run.add_argument("--data-workers", type=int, default=None, help="loader workers (default: CPU cores, <= 8)")
    run.add_argument("--no-data", action="store_true", help="skip the data input figure")
    run.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    run.add_argument("--name", default=None, help="file name stem (default: <host>-<date>)")
    return run.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    device = "cpu" if args.quick else pick_device(args.device)
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
        data_input = dict(image_size=cells[0].image_size, source="folder" if args.data_root else args.data_source,
                          root=args.data_root, num_workers=args.data_workers, device=device)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    # One thread per cell for --quick: with a CPU shared with other work, several OpenMP threads
    # per process spin at every barrier and the many small ops of a step slow down erratically.
    threads = args.threads or (1 if args.quick else None)
    run_suite(cells, args.out or RESULTS, device, warmup, args.repeats, args.budget_gb, data_input,
              command=command_line("run", argv), stem=args.name, threads=threads)
    return 0

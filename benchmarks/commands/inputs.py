"""Input benchmarks: two-view img/s by path (pipeline), by data.cache (caches), and the views' share of a step's memory (memory).

    python -m benchmarks inputs pipeline --image-size 32 --image-size 96   # img/s by input path
    python -m benchmarks inputs caches --image-size 96 --image-size 224    # img/s by data.cache
    python -m benchmarks inputs memory                                     # views' share of a step's peak
    python -m benchmarks inputs memory --image-size 512 --micro-batches 4 --batch 32

pipeline  per-image CPU workers against the batched views (decoded cache) on the CPU, in the
          workers and on a GPU; real CIFAR-10 JPEGs at 32 px, 500x375 / 375x500 mosaics of them
          above (benchmarks/harness/images.py)
caches    per-image against data.cache = decoded, encoded and none (views made in the workers),
          the encoded cache's decoding alone, and with a GPU the views there; 640x512 / 512x640
          mosaics, so every path decodes files with a shorter side of 512 px
memory    one real CPU training step under torch's MemTracker, fed views of the whole batch or
          lazy views per key chunk and micro-batch, beside the planner's prediction

Every path is the trainer's own input (data.pipeline.build_pipeline; benchmarks/harness/inputs.py
lists them). Writes <out>.json and <out>.md (default: benchmarks/results/<section>-cpu-<date>).
The aliases `pipeline`, `caches` and `input-memory` run the same sections.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..harness import input_memory
from ..harness.cli import ints
from ..harness.images import CIFAR10_TARBALL, WORK_DIR
from ..harness.inputs import PATHS, measure_section
from ..harness.results import RESULTS, command_line, dated, markdown_table, write_results

# section -> (default image sizes, images, batch, timed batches, rounds)
DEFAULTS = {"pipeline": ([32], 5000, 256, 8, 1), "caches": ([96, 224], 1000, 128, 6, 2)}
DATA = {"pipeline": "CIFAR-10 JPEGs at 32 px and below, photo-sized mosaics of them (500x375 and 375x500 px) above",
        "caches": "JPEGs of 640x512 and 512x640 px (mosaics of CIFAR-10 images)"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = p.add_subparsers(dest="section", required=True)
    for name, (sizes, images, batch, batches, rounds) in DEFAULTS.items():
        s = sections.add_parser(name, help=f"two-view img/s by {'input path' if name == 'pipeline' else 'data.cache'}")
        s.add_argument("--image-size", type=int, action="append",
                       help=f"crop size; repeat for several (default {', '.join(map(str, sizes))})")
        s.add_argument("--images", type=int, default=images, help="images to make and read")
        s.add_argument("--batch", type=int, default=batch)
        s.add_argument("--batches", type=int, default=batches, help="timed batches per path")
        s.add_argument("--workers", type=int, default=2, help="DataLoader workers")
        s.add_argument("--rounds", type=int, default=rounds, help="times each path is measured, in turns (best kept)")
        s.add_argument("--work-dir", type=Path, default=WORK_DIR, help="the images and the caches")
        s.add_argument("--tarball", type=Path, default=CIFAR10_TARBALL)
        s.add_argument("--note", default="", help="a sentence for the table's header (e.g. the machine's load)")
        s.add_argument("--out", "--json", type=Path, default=None, help="results path without suffix "
                       f"(default: benchmarks/results/{name}-cpu-<date>); a .md or .json suffix is dropped")
    m = sections.add_parser("memory", help="the input views' share of one step's peak, whole batch vs lazy")
    m.add_argument("--image-size", type=int, default=1024)
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--micro-batches", type=ints, default=[2, 4, 8], help="comma-separated")
    m.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return p.parse_args(argv)


def paths_markdown(results: list[dict], command: str, note: str) -> str:
    first = results[0]
    shown = [n for n in PATHS if any(n in r for r in results)]
    caches = [c for c in ("decoded", "encoded") if any(f"{c}_cache" in r for r in results)]
    body = [[r["image_size"], *(f"{r[n]:.0f}" if n in r else "-" for n in shown),
             *(_cache_text(r.get(f"{c}_cache")) for c in caches)] for r in results]
    lines = [f"# Input paths ({first['section']}): two-view images/s", "",
             f"Machine: {first['cpu']}, {first['cpu_threads']} CPU threads. {note}".rstrip(), "",
             f"Command: `{command}`", "",
             f"Data: {first['images']} images, {DATA[first['section']]}; batches of {first['batch']}, "
             f"{first['batches']} timed after one untimed, best of {first['rounds']} round(s) taken in turns; "
             f"{first['workers']} DataLoader workers. Paths: benchmarks/harness/inputs.py.", "",
             *markdown_table(["size", *shown, *(f"{c} cache per image" for c in caches)], body,
                             "l" + "r" * (len(shown) + len(caches)))]
    builds = [f"{r['image_size']} px " + " / ".join(str(r[f"{c}_cache"]["build_s"]) for c in caches if f"{c}_cache" in r)
              for r in results]
    if caches:
        lines += ["", f"Cache builds (s), {' / '.join(caches)}: " + "; ".join(builds)]
    return "\n".join(lines) + "\n"


def _cache_text(c: dict | None) -> str:
    if not c:
        return "-"
    return (f"{c['bytes_per_image']:,} B (sides {c['median_sides'][0]}x{c['median_sides'][1]}, "
            f"{c['reencoded']} re-encoded)")


def memory_markdown(rows: list[dict], command: str) -> str:
    arch, kwargs = input_memory.SMALL_BACKBONE
    body = [[r["image_size"], r["batch"], r["micro_batch"], r["views"], f"{r['peak_mib']:.1f}", f"{r['inputs_mib']:.1f}",
             f"{r['inputs_mib'] / r['peak_mib']:.0%}", f"{r['planned_mib']:.1f}"] for r in rows]
    return "\n".join([
        "# Input memory of one step: views of the whole batch vs lazy views", "",
        f"`{command}` on this machine's CPU (measured: torch MemTracker over one real step, fp32, {arch} with "
        f"timm_kwargs {kwargs}, key chunks of the micro-batch's size, K 4096; views made by the batched augmentation "
        "from 1280x1024 / 1024x1280 photos). 'planned' is the planner's fake-tensor prediction of the same step "
        "(no augmentation scratch).", "",
        *markdown_table(["size", "batch", "micro-batch", "views", "peak MiB", "inputs MiB", "inputs share",
                         "planned MiB"], body)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv or [])
    command = command_line("inputs", argv)
    if args.section == "memory":
        rows = input_memory.run(args.image_size, args.batch, tuple(args.micro_batches))
        paths = write_results(dated("input-memory-cpu"), rows, memory_markdown(rows, command), args.out)
        print(f"wrote {paths['md']}")
        return 0
    results = []
    for size in args.image_size or DEFAULTS[args.section][0]:
        r = measure_section(args.section, size, args.images, args.batch, args.batches, args.workers, args.work_dir,
                            args.tarball, args.rounds)
        print(json.dumps(r), flush=True)
        results.append(r)
    text = paths_markdown(results, command, args.note)
    print(text)
    paths = write_results(args.out or dated(f"{args.section}-cpu"), results, text)
    print(f"wrote {paths['md']}")
    return 0

"""Two-view images/s of the input paths by data.cache: decoded, encoded, none, and per-image.

    python -m benchmarks caches --image-size 96 --image-size 224 --out benchmarks/results/caches-cpu.md

Data: photo-sized JPEGs of 640x512 and 512x640 (5x4 mosaics of CIFAR-10 JPEGs upscaled to
128 px, made once by data_pipeline.composed_photos), so every path decodes real files with
a shorter side of 512 px. Paths, same batches of (index, sample_seed) keys, all on the CPU:

    per_image      DataLoader(TwoViews(FileImages, mocov2_transform(S))), N workers
    decoded        DecodedCache slices -> BatchedMoCoV2.two_views, inside N workers
    encoded        EncodedCache bytes -> decode_jpeg -> two_views, inside N workers
    none           the files' bytes read per batch -> decode_jpeg -> two_views, inside N workers
    encoded_decode EncodedCache bytes -> decode_jpeg only, in N workers (the decoding's share)
    cuda_*         with a GPU: decoded slices / encoded bytes (nvjpeg) -> two_views on the GPU

On a GPU the encoded path would hand the bytes over pinned and decode them there
(EncodedImages.to("cuda")); on a CPU the workers decode (EncodedStore.loader(decode="workers")).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lowmem_moco.data.augment.per_image import mocov2_transform
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.stores.decoded import DecodedCache
from lowmem_moco.data.stores.encoded import EncodedCache
from lowmem_moco.data.stores.encoded_store import SourceFiles
from lowmem_moco.data.two_views import TwoViews
from lowmem_moco.data.loader import make_loader

from .data_pipeline import (TARBALL, WORK_DIR, ViewsInWorker, _keys, cifar_subset, composed_photos, folder_images,
                            images_per_second)
from .suite import cpu_name


def _decoded_only(images, seeds):
    return images


def photos(count: int, work_dir: Path, tarball: Path) -> Path:
    """`count` JPEGs of 640x512 and 512x640, made once under work_dir."""
    return composed_photos(cifar_subset(max(count * 20 // 12, 5000), work_dir, tarball), count, 128, (5, 4))


def measure_caches(image_size: int, images: int = 1000, batch: int = 128, n_batches: int = 6, workers: int = 2,
                   work_dir: Path | str = WORK_DIR, tarball: Path | str = TARBALL, rounds: int = 2) -> dict:
    """Two-view images/s of each path at `image_size`, and the caches' sizes and build times."""
    work_dir = Path(work_dir)
    root = photos(images, work_dir, Path(tarball))
    data = folder_images(root)
    keys = _keys(len(data), batch, n_batches)
    r = dict(image_size=image_size, images=len(data), batch=batch, batches=n_batches, workers=workers, rounds=rounds,
             source=str(root), cpu=cpu_name(), cpu_threads=torch.get_num_threads())
    loader = make_loader(TwoViews(data, mocov2_transform(image_size), "skip"), workers=workers, batch_sampler=keys)
    stores = {}
    for name, kind in (("decoded", DecodedCache), ("encoded", EncodedCache)):
        started = time.perf_counter()
        store = kind.open_or_build(data, work_dir / "cache", image_size, name=root.parent.name, progress=False)
        m = store.manifest
        r[f"{name}_cache"] = dict(open_or_build_s=round(time.perf_counter() - started, 2), build_s=m["build_seconds"],
                                  bytes_per_image=m["bytes_per_image"], median_sides=m["median_sides"],
                                  reencoded=m.get("reencoded", 0))
        stores[name] = store
    stores["none"] = SourceFiles(data)
    paths = {"per_image": lambda: loader, "encoded_decode": lambda: stores["encoded"].loader(
        keys, workers, transform=_decoded_only)}
    paths.update({name: (lambda store=store: store.loader(keys, workers, transform=ViewsInWorker(image_size)))
                  for name, store in stores.items()})
    for _ in range(rounds):  # the paths take turns; the best round counts (others' load only slows)
        for name, make in paths.items():
            r[name] = max(r.get(name, 0.0), images_per_second(make(), n_batches, batch))
    if torch.cuda.is_available():
        device, augment = torch.device("cuda"), BatchedMoCoV2(image_size)

        def on_gpu(store):
            for images_in, _, seeds in store.loader(keys, workers, pin_memory=True):
                yield augment.two_views(images_in.to(device, non_blocking=True), seeds)

        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        r["cuda_decoded"] = images_per_second(on_gpu(stores["decoded"]), n_batches, batch, sync)
        r["cuda_encoded"] = images_per_second(on_gpu(stores["encoded"]), n_batches, batch, sync)
        r["cuda_device"] = torch.cuda.get_device_name(device)
    return r


COLUMNS = ("per_image", "decoded", "encoded", "none", "encoded_decode", "cuda_decoded", "cuda_encoded")


def markdown(results: list[dict], command: str, note: str) -> str:
    first = results[0]
    shown = [c for c in COLUMNS if any(c in r for r in results)]
    lines = ["# Input paths by data.cache: two-view images/s", "",
             f"Machine: {first['cpu']}, {first['cpu_threads']} CPU threads. {note}", "", "Command:", "",
             f"    {command}", "",
             f"Data: {first['images']} JPEGs of 640x512 and 512x640 px; batches of {first['batch']}, "
             f"{first['batches']} timed after one untimed, best of {first['rounds']} rounds taken in turns; "
             f"{first['workers']} DataLoader workers, each making "
             f"the views of whole batches (per_image: of single images).", "",
             "| size | " + " | ".join(shown) + " | decoded cache per image | encoded cache per image |",
             "|---|" + "---:|" * (len(shown) + 2)]
    for r in results:
        d, e = r["decoded_cache"], r["encoded_cache"]
        cells = [f"{r[c]:.0f}" if c in r else "-" for c in shown]
        lines.append(f"| {r['image_size']} | " + " | ".join(cells) +
                     f" | {d['bytes_per_image']:,} B (sides {d['median_sides'][0]}x{d['median_sides'][1]}) | "
                     f"{e['bytes_per_image']:,} B ({e['reencoded']} re-encoded) |")
    lines += ["", "Cache builds (s), decoded / encoded: " + "; ".join(
        f"{r['image_size']} px {r['decoded_cache']['build_s']} / {r['encoded_cache']['build_s']}" for r in results)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks caches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, action="append",
                        help="crop size; repeat for several (default 96, 224)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per path")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each path is measured, in turns (best kept)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="the photos and the caches")
    parser.add_argument("--tarball", type=Path, default=TARBALL)
    parser.add_argument("--note", default="", help="a sentence for the table's header (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, help="write the table as Markdown here (and the figures as .json)")
    args = parser.parse_args(argv)
    results = []
    for size in args.image_size or [96, 224]:
        r = measure_caches(size, args.images, args.batch, args.batches, args.workers, args.work_dir, args.tarball,
                           args.rounds)
        print(json.dumps(r), flush=True)
        results.append(r)
    command = "python -m benchmarks caches " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, command, args.note)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

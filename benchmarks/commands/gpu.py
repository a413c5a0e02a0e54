"""The one command for a machine with a GPU (< 8 min): CUDA tests, planner, speed, input, a CIFAR-10 run.

    python -m benchmarks gpu [--smoke] [--out FOLDER] [--tarball PATH]

    1. the CUDA-only tests (pytest -k cuda)
    2. the planner (on CUDA's rules for this card) against torch.cuda.max_memory_allocated for
       recipes/imagenet_resnet50_mocov2.yaml at micro-batches 32, 128, 256, fp16, checkpointing off and on, the GPU capped at 16 GiB;
       the error of each cell, and what the margin (plan.CUDA_MARGIN) must cover: reserved
       memory over the prediction, and the CUDA context
    3. the MoCo step's images/s over timm's supervised step's, same backbone and micro-batch; its
       host-device syncs per optimizer step, measured with torch's sync debug mode beside the
       rehearsal's count (lowmem-moco rehearse)
    4. the batched GPU input pipeline's two-view images/s at 224 px
    5. 2 epochs of recipes/cifar10_resnet18.yaml: s/epoch and kNN top-1
    6. lightly's MoCo v2 step beside ours (commands/peers.py; skipped, with a line, without lightly)

Writes benchmarks/results/gpu-<device>-<date>.{json,md}. Offline: the data is the CIFAR-10 JPEG
tarball at data/cifar10-train-jpeg.tar.gz (git-ignored; README: Tests).
`--smoke` runs the same sections at tiny sizes on a CPU (the test suite does). A section that
fails is reported and the others still run; the exit status is non-zero when any section
failed, when the CUDA tests failed (or, on a GPU, none ran) or a planner cell ran out of memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowmem_moco.config import load_config
from lowmem_moco.plan.predict import CUDA_MARGIN, PlannedStep

from ..harness.cells import Cell
from ..harness.cli import parser
from ..harness.images import CIFAR10_TARBALL, cifar_subset
from ..harness.inputs import measure_section
from ..harness.machine import environment
from ..harness.measure import time_together
from ..harness.results import REPO_ROOT, RESULTS, command_line, dated, markdown_table, write_results
from ..harness.syncs import card_for, markdown_lines as sync_lines, not_measured as syncs_not_measured
from ..harness.syncs import rehearsed as rehearsed_syncs
from . import peers
CAP_GIB = 16
FULL = dict(plan_recipe="recipes/imagenet_resnet50_mocov2.yaml", plan_overrides=[], micro_batches=(32, 128, 256),
            precision="fp16", speed=dict(arch="resnet50", image_size=224, micro_batch=128, batch=256,
                                         queue_size=65536, key_chunks=8),
            pipeline=dict(image_size=224, images=2048, batch=256, n_batches=6),
            # The tarball holds CIFAR-10's training split only: 10% is held out as the kNN test set
            # (the notebook tests on the 10,000 official test images).
            cifar_overrides=["train.epochs=2", "eval.knn_every=1", "train.checkpoint_every=0",
                             "data.val_fraction=0.1"], cifar_images=50000)
SMOKE = dict(plan_recipe="recipes/imagenet_resnet50_mocov2.yaml",
             plan_overrides=["model.arch=resnet18", "model.timm_kwargs.channels=[8,16,32,64]", "data.image_size=32",
                             "train.batch_size=8", "train.micro_batch_size=8", "moco.queue_size=256",
                             "moco.key_chunks=2"],
             micro_batches=(4, 8), precision="bf16",
             speed=dict(arch="resnet18", image_size=32, micro_batch=8, batch=16, queue_size=256, key_chunks=2),
             pipeline=dict(image_size=32, images=64, batch=16, n_batches=2),
             cifar_overrides=["train.epochs=1", "train.batch_size=32", "train.micro_batch_size=16",
                              "moco.queue_size=256", "moco.key_chunks=2", "model.timm_kwargs.channels=[8,16,32,64]",
                              "train.precision=no", "train.channels_last=false", "eval.knn_k=10",
                              "data.num_workers=0", "data.augment=batched",
                              "eval.knn_every=1", "train.checkpoint_every=0", "data.val_fraction=0.1"],
             cifar_images=200)


def cuda_tests(device: torch.device) -> dict:
    """pytest -k cuda over the test files that have CUDA-only tests (collecting the whole suite
    takes a while). Passed: exit status 0 and, on a GPU, at least one test passed ("no CUDA test
    ran", pytest's exit status 5 or every test skipped, is a failure there)."""
    files = [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "tests").rglob("test_*.py"))
             if "torch.cuda.is_available()" in p.read_text()]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *files],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    ran = re.search(r"\b[1-9]\d* passed", summary) is not None
    return dict(returncode=proc.returncode, summary=summary,
                passed=proc.returncode == 0 and (ran or device.type != "cuda"))


def measured_peak(cfg, precision: str, checkpointing: bool, micro_batch: int, real_cpu_step=None) -> dict:
    """The real step's peak: max_memory_allocated on a GPU (second step: optimizer state and
    cuDNN's autotuning done), MemTracker's on a CPU (`real_cpu_step`: a PlannedStep, fake=False)."""
    if real_cpu_step is not None:
        return dict(allocated=real_cpu_step.predict(micro_batch).peak_bytes)
    from ..harness.cuda_step import cuda_step_peaks
    return cuda_step_peaks(cfg, precision, checkpointing, micro_batch)


def planner_vs_measured(s: dict, device: torch.device, log) -> list[dict]:
    cells = []
    for ckpt in (False, True):
        cfg = load_config(s["plan_recipe"], s["plan_overrides"] + [f"train.grad_checkpointing={ckpt}"])
        # On a GPU the planner's own rules (CUDA's, for this card); on a CPU the CPU's, as measured there.
        planned_step = PlannedStep(cfg, s["precision"], ckpt, card=card_for("cuda") if device.type == "cuda" else None)
        real_cpu_step = PlannedStep(cfg, s["precision"], ckpt, fake=False) if device.type == "cpu" else None
        for mb in s["micro_batches"]:
            planned = planned_step.predict(mb)
            cell = dict(micro_batch=mb, checkpointing=ckpt, precision=s["precision"], planned=planned.peak_bytes,
                        plan_s=round(planned.seconds, 2))
            try:
                cell.update(measured_peak(cfg, s["precision"], ckpt, mb, real_cpu_step))
                cell["error"] = planned.peak_bytes / cell["allocated"] - 1
                if "reserved" in cell:
                    cell["reserved_over_planned"] = cell["reserved"] / planned.peak_bytes
            except torch.OutOfMemoryError as err:
                cell.update(oom=True, note=str(err).splitlines()[0][:200])
            error = f", error {cell['error']:+.1%}" if "error" in cell else ""
            log(f"  mb {mb:>4} ckpt {'on ' if ckpt else 'off'}: planned {planned.peak_bytes / 2**30:.3f} GiB, "
                f"measured {cell.get('allocated', float('nan')) / 2**30:.3f} GiB{error}")
            cells.append(cell)
    return cells


def speed(s: dict, device: str) -> dict:
    """Images/s of both steps; the MoCo step's host-device syncs per optimizer step, measured
    (a GPU only) beside the rehearsal's count for it (harness/syncs.py)."""
    v = s["speed"]
    precision = "no" if device == "cpu" else "fp16"
    moco = Cell("lowmem", v["arch"], v["image_size"], v["micro_batch"], v["batch"], precision, False,
                v["key_chunks"], device == "cuda", v["queue_size"])
    supervised = Cell("supervised", v["arch"], v["image_size"], v["micro_batch"], 0, precision,
                      channels_last=device == "cuda")
    a, b = time_together([moco, supervised], device, warmup=1, repeats=3, threads=1 if device == "cpu" else None,
                         syncs=True)
    ratio = a["images_per_s"] / b["images_per_s"] if a.get("images_per_s") and b.get("images_per_s") else None
    syncs = dict(measured=a.pop("syncs", None) or syncs_not_measured(a.get("error", "no GPU")),
                 rehearsed=rehearsed_syncs(moco, card_for(device)))
    m = syncs["measured"]
    print(f"  host-device syncs per optimizer step of the MoCo step: measured {m['count']} "
          f"({m['reason'] or 'torch.cuda.set_sync_debug_mode'}), rehearsed {syncs['rehearsed']['count']}")
    return dict(moco=a, supervised=b, moco_over_supervised=ratio, cell=moco.label, syncs=syncs)


def cifar_run(s: dict, tarball: Path, work: Path) -> dict:
    from lowmem_moco.trainer import Trainer

    root = cifar_subset(s["cifar_images"], work, tarball)
    out = work / f"run-{time.time_ns()}"
    cfg = load_config("recipes/cifar10_resnet18.yaml", ["data.source=folder", f"data.root={root}",
                                                        f"output_dir={out}"] + s["cifar_overrides"])
    start = time.perf_counter()
    Trainer(cfg).fit()
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [b["step"] - a for a, b in zip([0] + [r["step"] for r in epochs], epochs)]
    per_epoch = [round(n * cfg.train.batch_size / r["images_per_sec"], 1) for n, r in zip(steps, epochs)]
    return dict(whole_process_s=round(wall, 1), epochs=len(epochs), s_per_epoch=per_epoch,
                images_per_sec=[round(r["images_per_sec"], 1) for r in epochs],
                knn_top1=[r.get("knn_top1") for r in epochs], peak_mem_mb=[r["peak_mem_mb"] for r in epochs])


def _planner_lines(r: dict) -> list[str]:
    body = [[c["micro_batch"], "on" if c["checkpointing"] else "off", f"{c['planned'] / 2**30:.3f}",
             "OOM" if c.get("oom") else f"{c['allocated'] / 2**30:.3f}",
             f"{c['error']:+.1%}" if "error" in c else "-",
             f"{c['reserved'] / 2**30:.3f}" if "reserved" in c else "-"] for c in r["planner"]]
    lines = [f"## Planner (predicted) vs measured peak, {r['plan_recipe']}"
             f"{' ' + ' '.join(r['plan_overrides']) if r['plan_overrides'] else ''}, capped at {CAP_GIB} GiB", "",
             *markdown_table(["micro-batch", "checkpointing", "predicted GiB", "measured allocated GiB", "error",
                              "reserved GiB"], body)]
    m = r.get("margin")
    if m:
        lines += ["", f"What the margin must cover (measured): reserved / predicted up to {m['reserved_over_planned']:.3f}, "
                      f"memory outside PyTorch's allocator up to {m['outside_allocator_gib']:.2f} GiB; "
                      f"lowmem_moco/plan/predict.py's CUDA_MARGIN is {m['provisional']}"]
    return lines


def _speed_lines(r: dict) -> list[str]:
    sp = r["speed"]
    syncs = ["", *sync_lines(sp["syncs"], sp["cell"])] if sp.get("syncs") else []
    if not sp.get("moco_over_supervised"):
        return [f"MoCo step vs timm's supervised step ({sp.get('cell')}): not measured", *syncs]
    return [f"MoCo step vs timm's supervised step ({sp['cell']}): {sp['moco']['images_per_s']:.1f} vs "
            f"{sp['supervised']['images_per_s']:.1f} images/s, ratio {sp['moco_over_supervised']:.2f}", *syncs]


def _pipeline_lines(r: dict) -> list[str]:
    p = r["pipeline"]
    return [f"Input pipeline at {p['image_size']} px (two views, images/s): "
            + ", ".join(f"{k} {p[k]:.0f}" for k in ("per_image", "batched_cpu", "batched_cuda") if p.get(k))]


def _cifar_lines(r: dict) -> list[str]:
    c = r["cifar"]
    return [f"recipes/cifar10_resnet18.yaml, {c['epochs']} epoch(s): s/epoch {c['s_per_epoch']}, "
            f"kNN top-1 {c['knn_top1']}, whole-process {c['whole_process_s']} s"]


# key -> (title, the lines of its result in the Markdown, from the whole result)
def _peers_lines(r: dict) -> list[str]:
    p = r["peers"]
    if p.get("skipped"):
        return [f"lightly's MoCo v2 beside ours: skipped ({p['skipped']})"]
    return [f"lightly's MoCo v2 beside ours: {Path(p['files'][1]).name}"] + [
        f"- {c['label']}: " + ", ".join(f"{t['status']} {t['row']} {t['measure']} {t['ratio']:.3f}"
                                       for t in c["targets"]) for c in p["cells"]]


SECTIONS = {"cuda_tests": ("CUDA-only tests", lambda r: [f"CUDA-only tests: {r['cuda_tests']['summary']}"]),
            "planner": ("planner vs measured", _planner_lines), "speed": ("MoCo step vs supervised step", _speed_lines),
            "pipeline": ("input pipeline", _pipeline_lines), "cifar": ("CIFAR-10 run", _cifar_lines),
            "peers": ("lightly's MoCo v2 beside ours", _peers_lines)}


def markdown(r: dict) -> str:
    env = r["environment"]
    memory = f", total memory {env['gpu_memory_gb']:.2f} GiB" if "gpu_memory_gb" in env else ""
    lines = [f"# benchmarks gpu: {env['device_name']}", "", f"`{r['command']}`, torch {env['torch']}{memory}."]
    for key, (title, render) in SECTIONS.items():
        failed = r["failed"].get(key)
        lines += [""] + ([f"{title}: FAILED: {failed}"] if failed else render(r))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = parser("gpu", __doc__)
    p.add_argument("--smoke", action="store_true", help="the same sections at tiny sizes on a CPU")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--tarball", type=Path, default=CIFAR10_TARBALL, help="the CIFAR-10 JPEG tarball")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU is visible to PyTorch; run with --smoke to exercise this command on a CPU")
    s = SMOKE if args.smoke else FULL
    threads = torch.get_num_threads()
    if args.smoke:  # tiny steps: more threads only spin on a shared CPU
        torch.set_num_threads(1)
    if device.type == "cuda":  # behave like a 16 GiB card
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / total), device)
    try:
        with tempfile.TemporaryDirectory(prefix="lowmem_moco_gpu_") as scratch:  # smoke: removed afterwards
            work = Path(scratch) if args.smoke else REPO_ROOT / "data" / "gpu-bench"
            return run_sections(s, device, args.smoke, args.out, args.tarball, command_line("gpu", argv), work)
    finally:
        torch.set_num_threads(threads)  # the caller's (the test suite's) setting


def run_sections(s: dict, device: torch.device, smoke: bool, out_dir: Path, tarball: Path, command: str,
                 work: Path) -> int:
    """Every section, each on its own (one that raises is recorded as failed); writes the results;
    returns the exit status."""
    r = dict(command=command, environment=environment(device.type), plan_recipe=s["plan_recipe"],
             plan_overrides=s["plan_overrides"], planner=[], section_s={}, failed={})
    runs = {"cuda_tests": lambda: cuda_tests(device),
            "planner": lambda: planner_vs_measured(s, device, print),
            "speed": lambda: speed(s, device.type),
            "pipeline": lambda: measure_section("pipeline", **s["pipeline"], workers=2, work_dir=work,
                                                tarball=tarball, devices=(device.type,)),
            "cifar": lambda: cifar_run(s, tarball, work),
            # lightly's MoCo v2 beside ours; writes its own peers-<device>-<date>.{json,md}
            "peers": lambda: peers.gpu_section(smoke, device, out_dir)}
    start = time.perf_counter()
    for key, run in runs.items():
        print(f"{SECTIONS[key][0]} ...", flush=True)
        began = time.perf_counter()
        try:
            r[key] = run()
        except Exception as err:  # the other sections still run; the exit status says it
            r["failed"][key] = f"{type(err).__name__}: {err}"
            print(f"{SECTIONS[key][0]}: FAILED: {r['failed'][key]}", flush=True)
        r["section_s"][key] = round(time.perf_counter() - began, 1)
    r["whole_process_s"] = round(time.perf_counter() - start, 1)
    measured = [c for c in r["planner"] if "reserved" in c]
    if measured:  # what plan.CUDA_MARGIN has to cover, for the next person to set it from
        r["margin"] = dict(reserved_over_planned=max(c["reserved_over_planned"] for c in measured),
                           outside_allocator_gib=max(c["outside_allocator"] for c in measured) / 2**30,
                           provisional=CUDA_MARGIN)
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", r["environment"]["device_name"].lower()).strip("-")
    paths = write_results(dated(f"gpu-{slug}{'-smoke' if smoke else ''}"), r, markdown(r), out_dir)
    print(f"wrote {paths['json']} and {paths['md']} ({r['whole_process_s']} s)")
    ok = not r["failed"] and r["cuda_tests"]["passed"] and not any(c.get("oom") for c in r["planner"])
    return 0 if ok else 1

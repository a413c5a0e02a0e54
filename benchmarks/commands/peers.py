"""lightly's MoCo v2 example beside the project's step: peak memory and img/s, same images, backbone, batch, queue.

    python -m benchmarks peers --quick   # CPU, 1 thread: ResNet-18 at 32 px (small stem) and 128 px, reduced batches
    python -m benchmarks peers           # every cell for the device (CUDA adds ResNet-50 at 224 px, K 65536)

Rows of each cell, all from the same weights, queue, images, precision and optimizer (the
project's defaults: SGD, momentum 0.9, lr 0.03, wd 1e-4; T 0.2, m 0.999, MLP head to 128-d):
    lightly   lightly's documented MoCo v2 step, written from its public API: a timm backbone
              (lowmem_moco.backbones.create_backbone, so both have the identical model),
              MoCoProjectionHead, a deep-copied momentum encoder with deactivate_requires_grad,
              update_momentum, the whole batch of queries in one forward, then the keys under
              no_grad with batch_shuffle / batch_unshuffle, NTXentLoss with its memory bank
    same      the project's step (benchmarks.cells: the trainer's build_model / build_step) at
              the same settings: one micro-batch of the whole batch, one key chunk, no checkpointing
    quarter   its memory switches: checkpointing, micro-batches of B/4, 4 key chunks
    eighth    the split the CIFAR-10 and ImageNet recipes use: checkpointing, B/8, 8 key chunks

Memory: the first step of each row. On a CPU, MemTracker's peak tensor memory (only the row's
own tensors are counted); on CUDA, max_memory_allocated and max_memory_reserved above what was
held before the row was built (the cache emptied first). Speed: every row's steps interleaved in
one process (round robin), B / median step time. Writes results/peers-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from pathlib import Path

import torch

from lowmem_moco.backbones import create_backbone
from lowmem_moco.optim import build_optimizer

from ..harness.cells import DEFAULTS, Cell, Workload, build, prime_optimizer
from ..harness.cli import parser, pick_device
from ..harness.machine import environment
from ..harness.measure import interleaved_timings, step_memory
from ..harness.results import RESULTS, command_line, dated, markdown_table, write_results

INSTALL = 'lightly is not installed; install the peers extra: pip install -e ".[peers]"'
SPLITS = {"same": 1, "quarter": 4, "eighth": 8}  # the project's rows: micro-batches (= key chunks) per batch
ROWS = ("lightly", *SPLITS)  # as reported
BUILT = ("same", "lightly", "quarter", "eighth")  # as built and timed: lightly starts from `same`'s state
# The targets, as fractions of lightly's figure: (row, measure, bound, at most?).
TARGETS = (("same", "peak", 0.75, True), ("quarter", "peak", 0.25, True),
           ("same", "img/s", 1.0, False), ("quarter", "img/s", 0.95, False))


@dataclasses.dataclass(frozen=True)
class PeerCell:
    arch: str
    image_size: int
    batch: int
    queue_size: int
    small_image_stem: bool = False
    precision: str = "no"

    @property
    def label(self) -> str:
        stem = " small stem" if self.small_image_stem else ""
        precision = "fp32" if self.precision == "no" else self.precision
        return f"{self.arch} {self.image_size}px{stem} B{self.batch} K{self.queue_size} {precision}"

    def project_cell(self, row: str) -> Cell:
        """The project's step for a row (`lightly`: the settings lightly runs at, `same`'s)."""
        n = SPLITS.get(row, 1)
        return Cell("lowmem", self.arch, self.image_size, self.batch // n, self.batch, self.precision,
                    checkpointing=n > 1, key_chunks=n, queue_size=self.queue_size,
                    small_image_stem=self.small_image_stem)


def cells_for(device: str, quick: bool, precision: str = "no") -> list[PeerCell]:
    if quick:  # the reference cell is the second: ResNet-18, 128 px, batch 128, K 4096, fp32
        cells = [("resnet18", 32, 64, 4096, True), ("resnet18", 128, 128, 4096, False)]
    else:
        cells = [("resnet18", 32, 512, 4096, True), ("resnet18", 128, 256, 8192, False)]
        cells += [("resnet50", 224, 256, 65536, False)] if device == "cuda" else []
    return [PeerCell(*c, precision=precision) for c in cells]


def start_state(ours: Workload) -> dict:
    """The project's weights, queue and images before its first step, copied to the CPU (so that
    a row built from them holds its own tensors, and the copy is counted in no row)."""
    moco = ours.modules[0]
    cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
    return dict(backbone={k: cpu(v) for k, v in moco.encoder_q.backbone.state_dict().items()},
                head={k: cpu(v) for k, v in moco.encoder_q.head.state_dict().items()},
                queue=cpu(moco.queue), images=[cpu(t) for t in ours.inputs])


def lightly_workload(cell: Cell, device: torch.device, start: dict) -> tuple[Workload, torch.nn.Module]:
    """lightly's MoCo v2 step from the project's starting weights, queue and images (`start`),
    so that both first steps compute the same loss. Returns (workload, the loss module)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum

    backbone, width = create_backbone(cell.arch, cell.image_size, cell.small_image_stem)
    backbone.load_state_dict(start["backbone"])
    head = MoCoProjectionHead(width, width, DEFAULTS.model.dim)  # MoCo v2: Linear-ReLU-Linear, as ours
    head.layers.load_state_dict(start["head"])
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=DEFAULTS.moco.temperature,
                           memory_bank_size=(cell.queue_size, DEFAULTS.model.dim))
    modules = [m.to(device) for m in (backbone, head, backbone_m, head_m, criterion)]
    criterion.memory_bank.bank.copy_(start["queue"])
    optimizer = build_optimizer([*backbone.parameters(), *head.parameters()], DEFAULTS)
    x_q, x_k = (t.to(device) for t in start["images"])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cell.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cell.precision == "fp16")
    m = DEFAULTS.moco.momentum

    def step() -> float:  # the order of lightly's examples: momentum, queries, keys, loss
        update_momentum(backbone, backbone_m, m=m)
        update_momentum(head, head_m, m=m)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            query = head(backbone(x_q).flatten(start_dim=1))
            with torch.no_grad():
                shuffled, shuffle = batch_shuffle(x_k)
                key = batch_unshuffle(head_m(backbone_m(shuffled).flatten(start_dim=1)), shuffle)
            loss = criterion(query, key)  # enqueues the keys into the memory bank
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        return loss.item()

    return Workload(step=step, modules=modules, optimizer=optimizer, inputs=[x_q, x_k],
                    prime=prime_optimizer(optimizer)), criterion


def _held(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.empty_cache()  # what an earlier row freed must not be reused unseen
    return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.memory_reserved(device) / 2**20


def measure_cell(cell: PeerCell, device: torch.device, warmup: int, repeats: int) -> dict:
    rows, works = {}, []
    for row in BUILT:
        project = cell.project_cell(row)
        allocated, reserved = _held(device)
        if row == "lightly":
            work, criterion = lightly_workload(project, device, start)
        else:
            work = build(project, device)
            start = start_state(work) if row == "same" else start
        work.prime()
        mem = step_memory(work, device, breakdown=device.type == "cpu")
        for key, base in (("peak_mb", allocated), ("peak_no_input_mb", allocated), ("reserved_mb", reserved)):
            if key in mem:
                mem[key] -= base
        rows[row] = dict(mem, micro_batch=project.micro_batch, checkpointing=project.checkpointing,
                         key_chunks=project.key_chunks if row != "lightly" else None)
        works.append(work)
        if row == "lightly":
            rows[row]["bank_pointer_after"] = int(criterion.memory_bank.bank_ptr)
    timings = interleaved_timings([cell.batch] * len(works), works, device, warmup, repeats)
    for row, t in zip(BUILT, timings):
        rows[row].update(t)
    rows = {row: rows[row] for row in ROWS}
    ref = rows["lightly"]
    for r in rows.values():
        r["peak_vs_lightly"] = r["peak_mb"] / ref["peak_mb"]
        r["speed_vs_lightly"] = r["images_per_s"] / ref["images_per_s"]
    return dict(cell=dataclasses.asdict(cell), label=cell.label, rows=rows, targets=_targets(rows))


def _targets(rows: dict) -> list[dict]:
    out = []
    for row, what, bound, at_most in TARGETS:
        ratio = rows[row]["peak_vs_lightly" if what == "peak" else "speed_vs_lightly"]
        ok = ratio <= bound if at_most else ratio >= bound
        out.append(dict(row=row, measure=what, bound=bound, at_most=at_most, ratio=ratio,
                        status="PASS" if ok else "MISS"))
    return out


ROW_TEXT = {"lightly": "lightly {v}: documented MoCo v2 step", "same": "lowmem-moco, same settings",
            "quarter": "lowmem-moco, checkpointing, B/4", "eighth": "lowmem-moco, checkpointing, B/8 (recipes)"}


def markdown(r: dict) -> str:
    env, cuda = r["environment"], r["environment"]["device"] == "cuda"
    lines = [f"# lightly's MoCo v2 beside lowmem-moco: {env['device_name']}, {env['created'][:10]}", "",
             f"`{r['command']}`; torch {env['torch']}, timm {env['timm']}, lightly {env['lightly']}, "
             f"{env['threads']} thread(s); timings: the median of {r['repeats']} steps, rows interleaved, "
             f"after the memory step and {r['warmup']} warm-up step(s) (untimed).", ""]
    heads = ["row", "micro-batch", "key chunks", "peak MB", "vs lightly",
             *(["reserved MB"] if cuda else ["activ MB", "temp MB"]), "img/s", "vs lightly", "first-step loss"]
    for c in r["cells"]:
        rows = []
        for name, x in c["rows"].items():
            b = x.get("breakdown_mb", {})
            extra = [f"{x['reserved_mb']:.0f}"] if cuda else \
                [f"{b.get('activations', 0):.0f}", f"{b.get('temporaries', 0):.0f}"]
            rows.append([ROW_TEXT[name].format(v=env["lightly"]), x["micro_batch"], x["key_chunks"] or "-",
                         f"{x['peak_mb']:.0f}", f"{x['peak_vs_lightly']:.2f}", *extra, f"{x['images_per_s']:.1f}",
                         f"{x['speed_vs_lightly']:.2f}", f"{x['loss']:.4f}"])
        lines += [f"## {c['label']}", "", *markdown_table(heads, rows), ""]
        lines += [f"- {t['status']}: {t['row']} {t['measure']} vs lightly {t['ratio']:.3f} "
                  f"({'<=' if t['at_most'] else '>='} {t['bound']})" for t in c["targets"]] + [""]
    return "\n".join(lines)


def run(cells: list[PeerCell], device: torch.device, warmup: int, repeats: int, command: str, out_dir: Path,
        log=print) -> dict:
    import lightly

    env = dict(environment(device.type), lightly=lightly.__version__)
    r = dict(command=command, environment=env, warmup=warmup, repeats=repeats, cells=[])
    for cell in cells:
        log(f"{cell.label} ...", flush=True)
        r["cells"].append(measure_cell(cell, device, warmup, repeats))
        for t in r["cells"][-1]["targets"]:
            log(f"  {t['status']} {t['row']} {t['measure']} vs lightly {t['ratio']:.3f}")
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    paths = write_results(dated(f"peers-{slug}"), r, markdown(r), out_dir)
    log(f"wrote {paths['json']} and {paths['md']}")
    return dict(r, files=[str(paths["json"]), str(paths["md"])])


def gpu_section(smoke: bool, device: torch.device, out_dir: Path) -> dict:
    """The `gpu` command's section: every CUDA cell, or one tiny cell on a CPU (--smoke)."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        print(f"  skipped: {INSTALL}")
        return dict(skipped=INSTALL)
    if device.type == "cuda":  # the 16 GiB cap is for the planner's cells; lightly's ResNet-50 fp32 needs more
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    cells = [PeerCell("test_resnet", 32, 8, 64, small_image_stem=True)] if smoke else cells_for("cuda", False)
    command = "python -m benchmarks gpu" + (" --smoke" if smoke else "")
    return run(cells, device, warmup=0 if smoke else 1, repeats=1 if smoke else 3, command=command, out_dir=out_dir)


def main(argv: list[str]) -> int:
    p = parser("peers", __doc__)
    p.add_argument("--quick", action="store_true", help="CPU, 1 thread, reduced batches")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the memory step (default 1; --quick 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick)")
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no",
                   help="of every row (default no: fp32, as lightly's examples run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        import lightly  # noqa: F401
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.quick else pick_device(args.device))
    # One thread for --quick: on a CPU shared with other work, OpenMP threads wait at every barrier.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    r = run(cells_for(device.type, args.quick, args.precision), device, warmup, args.repeats,
            command_line("peers", argv), args.out)
    return 0 if all(math.isfinite(x["loss"]) for c in r["cells"] for x in c["rows"].values()) else 1

"""The issue's targets, checked against the measured cells (PASS / MISS with the ratio).

A target names the cell it judges (and the reference cell for a ratio) by configuration;
when the grid did not measure that configuration the target reads 'not measured'.
"""

from __future__ import annotations

from dataclasses import dataclass

MIXED = ("fp16", "bf16")
# The MoCo step as a fraction of a supervised step: 3 units (forward + backward) against 4
# (+ the key forward), 5 with checkpointing's second forward.
LIMIT_NO_CKPT, LIMIT_CKPT = 0.75, 0.6

CPU_TARGET_CELL = dict(arch="resnet18", image_size=128, micro_batch=128, batch=128, queue_size=4096,
                       precision="no", channels_last=False)
GPU_TARGET_CELL = dict(arch="resnet50", image_size=224, micro_batch=256, batch=256, queue_size=65536,
                       precision=MIXED, checkpointing=True, channels_last=(False, True))


@dataclass
class Target:
    name: str
    device: str  # cpu | cuda: where the target applies
    subject: dict  # fields of the judged cell; a tuple value means 'any of'
    metric: str  # a key of the cell's result
    bound: float
    higher_is_better: bool
    reference: dict | None = None  # fields of the reference cell: the figure is subject / reference
    note: str = ""


TARGETS = [
    Target("memory: checkpointing + 8 key chunks vs naive", "cpu",
           dict(CPU_TARGET_CELL, kind="lowmem", checkpointing=True, key_chunks=8),
           "peak_mb", 0.4, False, reference=dict(CPU_TARGET_CELL, kind="naive"),
           note="peak tensor memory of one full step (MemTracker)"),
    Target("speed: no checkpointing, 8 key chunks vs naive", "cpu",
           dict(CPU_TARGET_CELL, kind="lowmem", checkpointing=False, key_chunks=8),
           "images_per_s", 0.9, True, reference=dict(CPU_TARGET_CELL, kind="naive"),
           note="chunking the keys must not cost speed"),
    Target("accumulation: batch 256 as 2 x 128 vs batch 128", "cpu",
           dict(CPU_TARGET_CELL, kind="lowmem", checkpointing=True, key_chunks=8, batch=256),
           "peak_no_input_mb", 1.01, False, reference=dict(CPU_TARGET_CELL, kind="lowmem", checkpointing=True,
                                                           key_chunks=8),
           note="peak tensor memory beside the input images (the loader's batch of B images scales with B); "
                "1% allowed for what accumulation must hold: all gradients and the B keys"),
    Target("GPU memory: R50 224 px, K 65536, micro-batch 256, mixed, checkpointing", "cuda",
           dict(GPU_TARGET_CELL, kind="lowmem"), "peak_mb", 8192, False,
           note="torch.cuda.max_memory_allocated, MB (<= 8 GB)"),
    Target("GPU speed: same cell vs timm's supervised step", "cuda",
           dict(GPU_TARGET_CELL, kind="lowmem"), "vs_supervised", 0.9 * LIMIT_CKPT, True,
           note=f"fraction of the supervised step's images/s; limit {LIMIT_CKPT}, target 0.9x of it"),
]


def _matches(cell: dict, spec: dict) -> bool:
    for key, want in spec.items():
        have = cell.get(key)
        if isinstance(want, tuple) and have not in want or not isinstance(want, tuple) and have != want:
            return False
    return True


def _find(cells: list[dict], spec: dict, metric: str) -> dict | None:
    found = [c for c in cells if _matches(c, spec) and c.get(metric) is not None]
    return found[0] if found else None


def check(cells: list[dict], device_type: str) -> list[dict]:
    """One record per target that applies to this device."""
    out = []
    for t in TARGETS:
        if t.device != device_type:
            continue
        record = dict(name=t.name, metric=t.metric, bound=t.bound, note=t.note,
                      comparison=">=" if t.higher_is_better else "<=", status="not measured")
        subject = _find(cells, t.subject, t.metric)
        reference = _find(cells, t.reference, t.metric) if t.reference else None
        if subject is None or (t.reference and reference is None):
            out.append(record)
            continue
        value = subject[t.metric] / reference[t.metric] if reference else subject[t.metric]
        passed = value >= t.bound if t.higher_is_better else value <= t.bound
        record.update(value=value, status="PASS" if passed else "MISS", subject=subject["label"],
                      subject_value=subject[t.metric],
                      reference=reference["label"] if reference else None,
                      reference_value=reference[t.metric] if reference else None,
                      margin=value / t.bound)
        out.append(record)
    return out

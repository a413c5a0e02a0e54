"""`lowmem-moco plan --gpu auto`: plan for the CUDA GPU this machine has (a Colab session's).

A card the planner knows (T4, L4, A100 40/80 GB, H100) is planned as that card, with its
assumed capacity; any other with the total memory PyTorch reports and its compute capability
(validation.resolve_precision then refuses bf16 below 8.0, as training would).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .predict import GPUS, GiB, Gpu

AUTO = "auto"


@dataclass(frozen=True)
class CudaDevice:
    name: str
    total_bytes: int
    capability: tuple[int, int]


def cuda_device() -> CudaDevice | None:
    """The current CUDA device, None without one: the one place that asks torch (tests replace it)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return CudaDevice(torch.cuda.get_device_name(), props.total_memory, (props.major, props.minor))


def known_gpu(name: str, total_bytes: int) -> str | None:
    """GPUS's key for a device name such as 'Tesla T4' or 'NVIDIA A100-SXM4-80GB', else None."""
    # whole words only: 'l4' must not match an L40S
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    if "a100" in words:  # both sizes share the name's model number; 60 GiB lies between them
        return "a100-80" if total_bytes > 60 * GiB else "a100-40"
    return next((key for key in ("t4", "l4", "h100") if key in words), None)


def detect_gpu() -> tuple[Gpu, str]:
    """(the card to plan for, the sentence saying what was found)."""
    device = cuda_device()
    if device is None:
        raise ConfigError(f"--gpu auto found no CUDA GPU on this machine; name the card to plan for with "
                          f"--gpu NAME ({', '.join(GPUS)}) or give a memory budget with --budget-gb N")
    found = f"found {device.name} ({device.total_bytes / GiB:.2f} GiB)"
    key = known_gpu(device.name, device.total_bytes)
    if key is not None:
        return GPUS[key], f"{found}: planning as {key}"
    major, minor = device.capability
    card = Gpu(device.name, device.total_bytes / GiB, device.capability)
    return card, (f"{found}: not a card the planner knows; planning with its total memory "
                  f"(compute capability {major}.{minor})")

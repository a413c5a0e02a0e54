"""The machine a benchmark ran on: versions, threads, CPU and GPU, for every report."""

from __future__ import annotations

import datetime
import os
import platform
import socket

import torch


def environment(device: str, threads: int | None = None) -> dict:
    import accelerate
    import timm

    env = dict(host=socket.gethostname(), platform=platform.platform(), python=platform.python_version(),
               torch=torch.__version__, timm=timm.__version__, accelerate=accelerate.__version__,
               threads=threads or torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
               cpu_count=os.cpu_count(), device=device, cpu=cpu_name(),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
               created=datetime.datetime.now().isoformat(timespec="seconds"))
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = f"CPU ({env['cpu']}, {env['threads']} thread{'s' if env['threads'] != 1 else ''})"
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

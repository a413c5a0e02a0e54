"""Command-line pieces shared by the commands that measure a training step."""

from __future__ import annotations

import argparse
import sys

import torch


def ints(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128]."""
    return [int(x) for x in text.split(",") if x]


def pick_device(name: str) -> str:
    """auto | cpu | cuda -> cpu or cuda; exits when cuda is asked for and there is none."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to PyTorch")
    return name


def step_options(p: argparse.ArgumentParser) -> None:
    """--device, --warmup, --repeats, --threads: how cells are measured (run, fit)."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the memory step, which is never timed (default: 1; --quick: 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (default: PyTorch's, one per core; --quick: 1, which keeps "
                        "timings steady on a shared machine)")


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser: `python -m benchmarks <name>`, its module docstring as the help."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

"""`lowmem-moco train RECIPE [key=value ...]`, also as `python -m lowmem_moco` and under
`accelerate launch -m lowmem_moco`. User mistakes print one sentence, not a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowmem-moco", description="Memory-efficient MoCo v2 on one GPU (or a CPU).")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MoCo v2 from a recipe; resumes when output_dir has a checkpoint")
    t.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=10")
    return p


def _train(args) -> None:
    from .config import load_config
    from .train import train

    train(load_config(args.recipe, args.overrides))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    warnings.showwarning = lambda message, category, *a, **k: err.print(f"[yellow]warning:[/] {message}")
    try:
        {"train": _train}[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        err.print(f"[bold red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume from the last checkpoint")
        return 130
    return 0

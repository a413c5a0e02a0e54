"""The commands of `python -m benchmarks`: one module each, with `main(argv) -> int` and a module
docstring whose first line is its help line. COMMANDS is the one registry."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

# name -> (module in this package, arguments put before the user's). An entry with arguments is an
# alias of another command; "cell" is internal (one measurement in a fresh child process).
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "run": ("run", ()),
    "fit": ("fit", ()),
    "plan-check": ("plan_check", ()),
    "compile": ("compile", ()),
    "inputs": ("inputs", ()),
    "highres": ("highres", ()),
    "gpu": ("gpu", ()),
    "views-statistics": ("views_statistics", ()),
    "quality": ("quality", ()),
    "peers": ("peers", ()),
    "gradcache": ("gradcache", ()),
    "pipeline": ("inputs", ("pipeline",)),
    "caches": ("inputs", ("caches",)),
    "input-memory": ("inputs", ("memory",)),
    "cell": ("cell", ()),
}
HIDDEN = {"cell"}


def help_line(name: str) -> str:
    """The first line of the command's module docstring, read without importing it (torch is slow
    to import); an alias names what it runs."""
    module, prefix = COMMANDS[name]
    if prefix:
        return f"= inputs {' '.join(prefix)}"
    source = Path(importlib.util.find_spec(f"{__name__}.{module}").origin).read_text()
    return (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()[0]


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: python -m benchmarks COMMAND [ARGS]   (python -m benchmarks COMMAND --help: its arguments)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_line(name)}" for name in COMMANDS if name not in HIDDEN]
    return "\n".join(lines)


def dispatch(argv: list[str]) -> int:
    """Runs `python -m benchmarks <argv>`."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}")
        return 2
    module, prefix = COMMANDS[argv[0]]
    return importlib.import_module(f"{__name__}.{module}").main([*prefix, *argv[1:]])

"""(internal) One measurement in a fresh process: `python -m benchmarks cell '<json spec>'`."""

from __future__ import annotations

from ..harness.measure import cell_main


def main(argv: list[str]) -> int:
    return cell_main(argv)

"""Reading a sweep's finished cells back, also while it runs. Imports no torch."""

from __future__ import annotations

import json
from pathlib import Path

from patronus.sweep.layout import SweepError, SweepLayout, attack_name


def busy_seconds(cells: list[dict], done_files: list[Path]) -> float:
    """Length of the union of the cells' [finished - seconds, finished] intervals.

    That is the sweep's wall time over all sessions, without the gaps between them and
    without work lost in killed cells. Cells from versions that did not record `finished`
    use their done.json's modification time.
    """
    spans = []
    for cell, f in zip(cells, done_files):
        finished = cell["finished"] if "finished" in cell else f.stat().st_mtime
        spans.append((finished - cell.get("seconds", 0.0), finished))
    total, covered = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    return total


def sweep_summary(out: Path) -> dict:
    """The grid and every finished cell of a sweep directory (also of one still running)."""
    layout = SweepLayout(Path(out))
    if not layout.grid_file.is_file():
        raise SweepError(f"{out} is not a sweep directory (no grid.json)")
    done_files = layout.done_files()
    summary = {"grid": json.loads(layout.grid_file.read_text()),
               "cells": [json.loads(p.read_text()) for p in done_files]}
    # Over every session that worked on this sweep: the sum of its cells' attack + evaluation
    # times, and the wall time during which at least one cell was running.
    summary["cell_seconds_total"] = sum(c.get("seconds", 0.0) for c in summary["cells"])
    summary["wall_seconds_total"] = busy_seconds(summary["cells"], done_files)
    return summary


def results_by_cell(sweep: dict) -> dict[tuple, dict[str, dict]]:
    """(attack, optimizer, lr, seed) -> model -> results per budget: a sweep's cells, grouped so
    the protected model and its references under the same attack sit together."""
    out: dict[tuple, dict[str, dict]] = {}
    for c in sweep["cells"]:
        cell = c["cell"]
        out.setdefault((attack_name(cell), cell["optimizer"], cell["lr"], cell["seed"]), {})[c["model"]] = c["results"]
    return out

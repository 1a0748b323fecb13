"""`run_sweep`: run (or resume) a grid on a model, its unprotected original and scratch models.

A cell is finished when its `done.json` exists: a killed sweep rerun with the same command
skips finished cells and redoes the ones it was in. Attacked pipelines are deleted after
evaluation unless `keep_checkpoints` is set (a full grid would take many GB). One sweep at a
time holds a directory (`OUT/.lock`); `--workers` runs cells side by side. A protected
UNet-only cell reuses its unprotected twin's attack (see `cell.py`) and is queued right after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from patronus.attacks.registry import ATTACKS
from patronus.models.registry import resolve_model
from patronus.sweep.cell import CellJob, make_scratch, same_unet_attack_inputs
from patronus.sweep.executors import make_executor
from patronus.sweep.grid import GridConfig
from patronus.sweep.layout import MODELS, CellLayout, SweepError, SweepLayout, cell_id
from patronus.sweep.results import sweep_summary


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold OUT/.lock: two sweeps in one directory would run the same cells."""
    with open(SweepLayout(out).lock_file, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {out}; wait for it or stop it first") from None
        yield


def run_sweep(model: str, grid: GridConfig, out: Path, unprotected: str = "patronus-tiny", workers: int = 1) -> dict:
    """Run (or resume) the sweep; returns and writes `sweep.json` with every evaluated cell.

    `workers` > 1 runs that many cells side by side in spawned processes, the CPU's threads
    shared out between them.
    """
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    layout = SweepLayout(out)
    resolve_model(model)
    resolve_model(unprotected)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _check_same_sweep(layout, grid, {"protected": str(resolve_model(model).resolve()),
                                         "unprotected": str(resolve_model(unprotected).resolve())})
        t0 = time.time()
        targets = {"protected": model}
        if "unprotected" in grid.references:
            targets["unprotected"] = unprotected
        names = [n for n in MODELS if n in targets or n in grid.references]
        share = "unprotected" in targets and same_unet_attack_inputs(model, unprotected)

        def shared(cell: dict) -> bool:
            return share and ATTACKS[cell["kind"]].unet_only

        todo = [(name, cell) for cell in grid.cells() for name in names if not layout.cell(name, cell).done.exists()]
        # An unprotected UNet-only attack is kept until its protected twin has used it.
        _remove_leftovers(layout, grid, keep=lambda name, cell: name == "unprotected" and shared(cell)
                          and not layout.cell("protected", cell).done.exists())
        for kind in sorted({cell["kind"] for name, cell in todo if name == "scratch"}):  # before any worker needs it
            targets[f"scratch-{kind}"] = str(make_scratch(unprotected, kind, layout.scratch(kind)))
        # A protected UNet-only cell waits for its unprotected twin, whose attack it reuses,
        # and runs as soon as the twin is done.
        pending_twin = {cell_id(c) for n, c in todo if n == "unprotected" and shared(c)}
        waiting = {cell_id(c): (n, c) for n, c in todo if n == "protected" and shared(c) and cell_id(c) in pending_twin}
        queue = deque(t for t in todo if not (t[0] == "protected" and cell_id(t[1]) in waiting))

        def job(name: str, cell: dict) -> CellJob:
            source = layout.cell("unprotected", cell).attack
            reuse = shared(cell) and name == "protected" and source.is_dir()
            return CellJob(model_name=name, cell=cell,
                           target=targets[f"scratch-{cell['kind']}" if name == "scratch" else name],
                           model=model, grid=grid, sweep_root=out,
                           reuse_from=str(source) if reuse else None,
                           keep_attack=grid.keep_checkpoints or (shared(cell) and name == "unprotected"))

        print(f"sweep: {len(grid.cells()) * len(names) - len(todo)} cells done, {len(todo)} to run"
              f"{f' on {workers} workers (logs in each cell dir)' if workers > 1 else ''}", flush=True)
        bar = tqdm(total=len(todo), desc="sweep cells", unit="cell", disable=not todo)
        executor = make_executor(workers)
        running: dict[Future, tuple[str, dict]] = {}
        try:
            while queue or running:
                while queue and len(running) < executor.slots:  # feed the workers one cell at a time, in queue order
                    name, cell = queue.popleft()
                    bar.set_postfix_str(f"{name} {cell_id(cell)}")
                    running[executor.submit(job(name, cell))] = (name, cell)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name, cell = running.pop(fut)
                    if fut.exception() is not None:
                        bar.write(f"{name} {cell_id(cell)} failed ({fut.exception()!r}; traceback in "
                                  f"{layout.cell(name, cell).log}); waiting for the running cells, then stopping")
                        queue.clear()
                        fut.result()
                    done = fut.result()
                    bar.write(f"{name} {cell_id(cell)}: unsafe " + " ".join(
                        f"{s}:{100 * r['unsafe_rate']['value']:.0f}%" for s, r in done["results"].items())
                        + f" ({done['seconds'] / 60:.1f} min)")
                    bar.update()
                    if name == "unprotected" and cell_id(cell) in waiting:
                        queue.appendleft(waiting.pop(cell_id(cell)))
        finally:
            executor.shutdown()
            bar.close()
        summary = sweep_summary(out) | {"wall_seconds_this_run": time.time() - t0}
        layout.summary_file.write_text(json.dumps(summary, indent=2))
        return summary


def _check_same_sweep(layout: SweepLayout, grid: GridConfig, models: dict[str, str]) -> None:
    """Refuse to resume a sweep directory with another grid or other models; record them otherwise."""
    for f, ours in ((layout.grid_file, asdict(grid)), (layout.models_file, models)):
        if f.exists() and json.loads(f.read_text()) != json.loads(json.dumps(ours)):
            raise SweepError(f"{layout.root} holds a sweep with a different {f.stem} ({f}); use a new --out")
        f.write_text(json.dumps(ours, indent=2))


def _remove_leftovers(layout: SweepLayout, grid: GridConfig, keep: Callable[[str, dict], bool]) -> None:
    """Delete checkpoints of finished cells that a killed run did not get to delete."""
    if grid.keep_checkpoints:
        return
    for attack in layout.attack_dirs():
        done = CellLayout(attack.parent).done
        if done.exists():
            d = json.loads(done.read_text())
            if not keep(d["model"], d["cell"]):
                shutil.rmtree(attack)

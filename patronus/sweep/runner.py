"""`run_sweep`: run (or resume) a grid on a model and its references (unprotected original,
scratch models, the model with the original VAE put back, the data-filtered model).

A cell is finished when its `done.json` exists: a killed sweep rerun with the same command
skips finished cells and redoes the ones it was in. Attacked pipelines are deleted after
evaluation unless `keep_checkpoints` is set (a full grid would take many GB). One sweep at a
time holds a directory (a kernel lock on OUT, released however the run ends); `--workers`
runs cells side by side. A UNet-only cell whose attack is bitwise its twin's reuses it (see
`cell.py`) and is queued right after the twin.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from patronus.attacks.registry import ATTACKS
from patronus.io import locked_dir
from patronus.models.registry import ModelLoadError, check_no_pickles, resolve_model
from patronus.provenance import weight_hashes, weights_digest
from patronus.sweep.cell import CellJob, make_original_vae, make_scratch, same_unet_attack_inputs
from patronus.sweep.executors import Executor, ExecutorConfig, make_executor
from patronus.sweep.grid import GridConfig, with_added_settings
from patronus.sweep.layout import MODELS, CellLayout, SweepError, SweepLayout, cell_id, kind_name
from patronus.sweep.results import sweep_summary

T = TypeVar("T")


def _exclusive(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold OUT: two sweeps in one directory would run the same cells."""
    return locked_dir(out, f"another sweep is running in {out}; wait for it or stop it first")


def run_sweep(model: str, grid: GridConfig, out: Path, unprotected: str = "patronus-tiny", workers: int = 1,
              executor: ExecutorConfig = ExecutorConfig(), filtered: str = "patronus-tiny-filtered") -> dict:
    """Run (or resume) the sweep; returns and writes `sweep.json` with every evaluated cell.

    `workers` > 1 runs that many cells side by side in spawned processes, the CPU's threads
    shared out between them. `filtered`: the data-filtered reference (used when the grid's
    references name it).
    """
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    layout = SweepLayout(out)
    references = {"filtered": filtered} if "filtered" in grid.references else {}
    for m in (model, unprotected, *references.values()):  # the cells load them; refuse here what they would refuse
        check_no_pickles(resolve_model(m))
    check_source(model, unprotected)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _check_same_sweep(layout, grid, models_record(model, unprotected, references))
        t0 = time.time()
        targets = {"protected": model} | references
        if "unprotected" in grid.references:
            targets["unprotected"] = unprotected
        share = "unprotected" in targets and same_unet_attack_inputs(model, unprotected)

        def runs(name: str, cell: dict) -> bool:
            return name in targets or (name in grid.references
                                       and (name != "original-vae" or ATTACKS[cell["kind"]].unet_only))

        def twin(name: str, cell: dict) -> str | None:
            """The model whose attack this cell reuses: same UNet-only attack, another decoder."""
            if not ATTACKS[cell["kind"]].unet_only:
                return None
            if name == "protected" and share:
                return "unprotected"
            return "protected" if name == "original-vae" else None

        def dependents(name: str, cell: dict) -> list[str]:
            return [n for n in MODELS if runs(n, cell) and twin(n, cell) == name]

        all_cells = [(name, cell) for cell in grid.cells() for name in MODELS if runs(name, cell)]
        todo = [(name, cell) for name, cell in all_cells if not layout.cell(name, cell).done.exists()]
        # A twin's attack is kept until every cell reusing it is done.
        _remove_leftovers(layout, grid, keep=lambda name, cell: any(
            not layout.cell(d, cell).done.exists() for d in dependents(name, cell)))
        scratch_cells = {kind_name(cell): cell for name, cell in todo if name == "scratch"}
        for scratch, cell in sorted(scratch_cells.items()):  # before any worker needs it
            targets[f"scratch-{scratch}"] = str(make_scratch(unprotected, cell["kind"], layout.scratch(scratch),
                                                             freeze_text_encoder=bool(cell.get("freeze_text_encoder"))))
        # A cell that reuses a twin's attack waits for the twin and runs as soon as it is done.
        pending = {(n, cell_id(c)) for n, c in todo}
        waiting = {(n, cell_id(c)): (n, c) for n, c in todo if (twin(n, c), cell_id(c)) in pending}
        queue = deque(t for t in todo if (t[0], cell_id(t[1])) not in waiting)

        def job(name: str, cell: dict) -> CellJob:
            source = layout.cell(twin(name, cell), cell).attack if twin(name, cell) else None
            reuse = source is not None and source.is_dir()
            if name == "scratch":
                target = targets[f"scratch-{kind_name(cell)}"]
            elif name == "original-vae":  # its own attack only where the twin's checkpoints are gone
                target = model if reuse else str(make_original_vae(model, unprotected, layout.original_vae()))
            else:
                target = targets[name]
            return CellJob(model_name=name, cell=cell, target=target,
                           vae_from=unprotected if name == "original-vae" else model, grid=grid, sweep_root=out,
                           reuse_from=(twin(name, cell), str(source)) if reuse else None,
                           keep_attack=grid.keep_checkpoints or bool(dependents(name, cell)))

        def release(name: str, cell: dict) -> None:
            """Queue the cells waiting for this one; remove its twin's checkpoints once nobody needs them."""
            for n in dependents(name, cell):
                if (n, cell_id(cell)) in waiting:
                    queue.appendleft(waiting.pop((n, cell_id(cell))))
            src = twin(name, cell)
            if src and not grid.keep_checkpoints and all(layout.cell(d, cell).done.exists()
                                                         for d in dependents(src, cell)):
                shutil.rmtree(layout.cell(src, cell).attack, ignore_errors=True)

        print(f"sweep: {len(all_cells) - len(todo)} cells done, {len(todo)} to run"
              f"{f' on {workers} workers (logs in each cell dir)' if workers > 1 else ''}", flush=True)
        bar = tqdm(total=len(todo), desc="sweep cells", unit="cell", disable=not todo)
        run_cells(queue, lambda item: job(*item), make_executor(workers, executor), bar,
                  lambda item, done: release(*item))
        summary = sweep_summary(out) | {"wall_seconds_this_run": time.time() - t0}
        layout.summary_file.write_text(json.dumps(summary, indent=2))
        return summary


def models_record(model: str, unprotected: str, references: dict[str, str] | None = None) -> dict[str, str]:
    """The sweep's models by path and by weights: a model re-made at the same path (a re-shipped
    `patronus-tiny-protected`) must not resume a sweep whose cells attacked the old weights."""
    record = {}
    for name, m in (("protected", model), ("unprotected", unprotected), *(references or {}).items()):
        path = resolve_model(m).resolve()
        record |= {name: str(path), f"{name}_weights_sha256": weights_digest(weight_hashes(path))}
    return record


def _sources(model: str) -> tuple[list[tuple[str, str]], bool]:
    """The chain of models `model` was made from (a distilled student names its teacher, which
    names the original), as (path, weights sha256) pairs from each patronus.json; and whether the
    chain was read to its end (False where a named model is not on this machine)."""
    chain: list[tuple[str, str]] = []
    current = resolve_model(model)
    while (current / "patronus.json").exists() and len(chain) < 16:  # 16: a chain that loops ends
        source = json.loads((current / "patronus.json").read_text()).get("source_model") or {}
        if not source.get("weights_sha256"):
            break
        chain.append((source.get("path") or "an unnamed model", source["weights_sha256"]))
        try:
            current = resolve_model(source["path"]) if source.get("path") else None
        except ModelLoadError:
            current = None
        if current is None:
            return chain, False
    return chain, True


def check_source(model: str, unprotected: str) -> None:
    """Refuse an unprotected model that `model` was not made from (its patronus.json, and its
    teacher's, name them by weights): the original-VAE cells would render `model`'s latents with
    another model's VAE, and the unprotected column would measure another model."""
    chain, complete = _sources(model)
    if not chain or not complete or weights_digest(weight_hashes(resolve_model(unprotected))) in {h for _, h in chain}:
        return
    raise SweepError(f"{model} was made from {' <- '.join(p for p, _ in chain)}, not from {unprotected} (other "
                     f"weights); pass --unprotected {chain[-1][0]}")


def _check_same_sweep(layout: SweepLayout, grid: GridConfig, models: dict[str, str]) -> None:
    """Refuse to resume a sweep directory with another grid or other models; record them otherwise. A
    grid.json written before a grid setting existed counts as that setting at its default."""
    for f, ours, saved_as in ((layout.grid_file, asdict(grid), with_added_settings),
                              (layout.models_file, models, lambda saved: saved)):
        if f.exists() and saved_as(json.loads(f.read_text())) != json.loads(json.dumps(ours)):
            raise SweepError(f"{layout.root} holds a sweep with a different {f.stem} ({f}: other settings, or a "
                              "model with other weights); use a new --out")
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


def run_cells(queue: deque[T], make_job: Callable[[T], CellJob], pool: Executor, bar: tqdm,
              on_done: Callable[[T, dict], None]) -> None:
    """Feed `pool` from `queue`, one cell at a time in queue order (a job is made when it starts,
    so it sees what finished before it); `on_done` may queue more. A failed cell stops the sweep."""
    running: dict[Future, tuple[T, CellJob]] = {}
    try:
        while queue or running:
            while queue and len(running) < pool.slots:
                item = queue.popleft()
                cell_job = make_job(item)
                bar.set_postfix_str(f"{cell_job.model_name} {cell_id(cell_job.cell)}")
                running[pool.submit(cell_job)] = (item, cell_job)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                item, cell_job = running.pop(fut)
                name = f"{cell_job.model_name} {cell_id(cell_job.cell)}"
                if fut.exception() is not None:
                    log = SweepLayout(cell_job.sweep_root).cell(cell_job.model_name, cell_job.cell).log
                    bar.write(f"{name} failed ({fut.exception()!r}; traceback in {log}); stopping")
                    queue.clear()
                    fut.result()
                done = fut.result()
                bar.write(f"{name}: unsafe " + " ".join(f"{s}:{100 * r['unsafe_rate']['value']:.0f}%"
                                                        for s, r in done["results"].items())
                          + f" ({done['seconds'] / 60:.1f} min)")
                bar.update()
                on_done(item, done)
    finally:
        pool.shutdown()
        bar.close()

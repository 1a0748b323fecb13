"""`patronus sweep`: a grid of attacks on a model and on its two references, every checkpoint evaluated.

The grid file (TOML or YAML) names attack kinds, optimizers, learning rates, budgets
(checkpoint steps) and seeds; the sweep runs their product on the protected model, on the
**unprotected** original and on a **scratch** model (the original with the attacked
components re-initialised at random). Every checkpoint is evaluated with the evaluation
harness. A cell is finished when its `done.json` exists: a killed sweep rerun with the same
command skips finished cells and redoes the ones it was in. Attacked pipelines are deleted
after evaluation unless `keep_checkpoints` is set (a full grid would take many GB). One
sweep at a time holds a directory (`OUT/.lock`); `--workers` runs cells side by side.

A UNet-only attack reads nothing that `patronus protect` changes, so when the protected
model's UNet, text encoder, tokenizer, scheduler and VAE encoder are bitwise those of the
unprotected one, its attack is not run twice: the protected cell takes the unprotected
cell's attacked pipelines with its own VAE put in (`attack_reused_from` in done.json).

Sampled latents depend only on the files outside `vae/` (the evaluation's generation
digest). An evaluation whose digest and settings match one already in the sweep decodes
that one's saved latents with its own decoder instead of sampling them again
(`timing.latents_from` in its metrics.json). That covers the protected UNet-only cells and
every checkpoint of a decoder-full attack after its cell's first (the UNet is untouched).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import multiprocessing
import shutil
import time
import tomllib
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from patronus.attacks.finetune import AttackSettings, run_attack
from patronus.evaluation.harness import LATENTS_FILE, EvalSettings, evaluate, generation_digest, resolve_prompts
from patronus.models.registry import load_pipeline, resolve_model
from patronus.moderator.losses import DecoderHead

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"


class SweepError(ValueError):
    """A sweep that cannot start as asked (bad settings, or an output dir of another grid)."""


@dataclass(frozen=True)
class Grid:
    kinds: tuple[str, ...] = ("unet-full", "unet-lora", "decoder-full", "joint")
    ranks: tuple[int, ...] = (4, 64)  # expands every *-lora kind
    optimizers: tuple[str, ...] = ("adam", "sgd")
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    budgets: tuple[int, ...] = (100, 500, 2000)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    data: str = "attacker"
    suite: str = "glyph"
    references: tuple[str, ...] = ("unprotected", "scratch")
    keep_checkpoints: bool = False
    eval: dict = field(default_factory=dict)  # extra EvalSettings fields (steps, guidance, ...)

    def cells(self) -> list[dict]:
        kinds = [(k, r) for k in self.kinds for r in (self.ranks if k.endswith("-lora") else (None,))]
        return [{"kind": k, "rank": r, "optimizer": o, "lr": lr, "seed": s}
                for (k, r), o, lr, s in itertools.product(kinds, self.optimizers, self.lrs, self.seeds)]


def attack_name(cell: dict) -> str:
    """The attack kind with its LoRA rank, e.g. `unet-lora-r4`."""
    return cell["kind"] + (f"-r{cell['rank']}" if cell["rank"] else "")


def cell_id(cell: dict) -> str:
    return f"{attack_name(cell)}_{cell['optimizer']}_lr{cell['lr']:g}_s{cell['seed']}"


def load_grid(path: str | Path) -> Grid:
    """A grid file, or the name of one shipped in patronus/grids (`default`, `quick`)."""
    path = Path(path)
    if not path.exists() and (GRIDS_DIR / f"{path}.toml").exists():
        path = GRIDS_DIR / f"{path}.toml"
    if not path.is_file():
        raise ValueError(f"grid file {path} not found (shipped grids: "
                         f"{', '.join(p.stem for p in sorted(GRIDS_DIR.glob('*.toml')))})")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"grid file {path} is not valid: {str(e).splitlines()[0]}") from e
    return grid_from_dict(values, path)


def grid_from_dict(values: object, source: str | Path) -> Grid:
    """A checked Grid from the settings of a grid file or of a sweep's `grid.json`."""
    if not isinstance(values, dict):
        raise ValueError(f"grid file {source} must hold settings (name = value), not {type(values).__name__}")
    if unknown := set(values) - set(Grid.__dataclass_fields__):
        raise ValueError(f"unknown grid setting(s) in {source}: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        _check_type(source, name, value)
    grid = Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    check_grid(grid)
    return grid


# The type every grid setting must have: lists of these (`list`) or a single one.
_LIST_TYPES: dict[str, tuple[type, ...]] = {"kinds": (str,), "ranks": (int,), "optimizers": (str,),
                                            "lrs": (int, float), "budgets": (int,), "seeds": (int,),
                                            "references": (str,)}
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"batch_size": (int,), "data": (str,), "suite": (str,),
                                              "keep_checkpoints": (bool,), "eval": (dict,)}


def _check_type(path: str | Path, name: str, value: object) -> None:
    def ok(v: object, types: tuple[type, ...]) -> bool:
        return isinstance(v, types) and (bool in types or not isinstance(v, bool))

    if name in _LIST_TYPES:
        types = _LIST_TYPES[name]
        if not isinstance(value, list) or not value or not all(ok(v, types) for v in value):
            hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if name == "lrs" else ""
            raise ValueError(f"grid setting {name} in {path} must be a non-empty list of "
                             f"{' or '.join(t.__name__ for t in types)}, got {value!r}{hint}")
    elif not ok(value, _SCALAR_TYPES[name]):
        raise ValueError(f"grid setting {name} in {path} must be of type {_SCALAR_TYPES[name][0].__name__}, "
                         f"got {value!r}")


def check_grid(grid: Grid) -> None:
    """Every setting a sweep would trip over only after hours of attacks, checked before the first."""
    for cell in grid.cells():
        attack_settings(grid, cell).validate()
    if unknown := set(grid.references) - {"unprotected", "scratch"}:
        raise ValueError(f"unknown reference(s) {', '.join(sorted(unknown))}; choose from unprotected, scratch")
    allowed = [f for f in EvalSettings.__dataclass_fields__ if f != "suite"]  # the suite is a grid setting
    if unknown := set(grid.eval) - set(allowed):
        raise ValueError(f"unknown eval setting(s) {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    resolve_prompts(EvalSettings(suite=grid.suite, **grid.eval))
    if grid.data != "attacker" and not (Path(grid.data) / "metadata.jsonl").is_file():
        raise ValueError(f"grid data {grid.data!r} is neither 'attacker' nor an image folder with metadata.jsonl")


def attack_settings(grid: Grid, cell: dict) -> AttackSettings:
    return AttackSettings(kind=cell["kind"], data=grid.data, optimizer=cell["optimizer"], lr=cell["lr"],
                          steps=max(grid.budgets), rank=cell["rank"] or 8, batch_size=grid.batch_size,
                          save_at=tuple(grid.budgets), seed=cell["seed"])


def make_scratch(model: str, kind: str, out: Path, seed: int = 0) -> Path:
    """The original pipeline with the components `kind` attacks re-initialised at random."""
    if out.exists():
        return out
    pipe = load_pipeline(model)
    torch.manual_seed(seed)
    if kind.startswith("unet") or kind == "joint":
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)
    if kind.startswith("decoder") or kind == "joint":
        fresh = AutoencoderKL.from_config(pipe.vae.config)
        DecoderHead(pipe.vae).load_state_dict(DecoderHead(fresh).state_dict())
    if kind == "joint":
        pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    return out


UNET_ONLY = ("unet-full", "unet-lora")


def same_unet_attack_inputs(a: str, b: str) -> bool:
    """Whether a UNet-only attack computes the same thing on both pipelines.

    Such an attack reads the UNet, text encoder, tokenizer, scheduler and the VAE *encoder*
    (for the latents of its images); the decoder only renders the results. `patronus protect`
    changes the decoder alone, so a protected model and its original share the attack exactly.
    """
    ra, rb = resolve_model(a), resolve_model(b)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        fa = sorted(f.relative_to(ra) for f in (ra / sub).rglob("*") if f.is_file())
        fb = sorted(f.relative_to(rb) for f in (rb / sub).rglob("*") if f.is_file())
        if fa != fb or any((ra / f).read_bytes() != (rb / f).read_bytes() for f in fa):
            return False
    va, vb = (AutoencoderKL.from_pretrained(r / "vae") for r in (ra, rb))
    # Everything but the decoder head: the encoder, and quant_conv where the VAE has one.
    ea, eb = ({k: v for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
              for vae in (va, vb))
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def _reuse_attack(source: Path, model: str, out: Path, budgets: tuple[int, ...]) -> list[Path]:
    """The unprotected model's attacked checkpoints with `model`'s VAE put in."""
    vae = resolve_model(model) / "vae"
    ckpts = []
    steps = sorted(int(c.name.split("-")[1]) for c in source.glob("step-*"))
    if steps != sorted(budgets):
        raise SweepError(f"{source} holds checkpoints {steps}, expected {sorted(budgets)}; delete it to rerun")
    for ckpt in sorted(source.glob("step-*"), key=lambda c: int(c.name.split("-")[1])):
        shutil.copytree(ckpt, out / ckpt.name, ignore=shutil.ignore_patterns("vae"))
        shutil.copytree(vae, out / ckpt.name / "vae")
        ckpts.append(out / ckpt.name)
    return ckpts


def _run_cell(name: str, cell: dict, target: str, reuse_from: str | None, model: str, grid: Grid,
              cdir: Path, keep_attack: bool, threads: int | None) -> dict:
    """Attack one model with one cell (or reuse an attack), evaluate every checkpoint, write done.json.

    With `threads` set it runs in a worker process: torch gets that many threads and the
    attack's and evaluation's progress bars (and a traceback, if it fails) go to
    `cdir/log.txt` instead of the terminal.
    """
    t_cell = time.time()
    shutil.rmtree(cdir, ignore_errors=True)
    cdir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if threads is not None:
            torch.set_num_threads(threads)
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(cdir / "log.txt", "w"))))
        try:
            results = _attack_and_evaluate(cell, target, reuse_from, model, grid, cdir)
        except Exception:
            traceback.print_exc()
            raise
    done = {"model": name, "cell": cell, "results": results, "seconds": time.time() - t_cell,
            "finished": time.time(), "attack_reused_from": "unprotected" if reuse_from else None}
    tmp = cdir / "done.json.partial"
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(cdir / "done.json")  # a cell is done when done.json exists: never half-written
    # Only now the checkpoints go; a kill in between leaves files that the next run removes.
    if not keep_attack:
        shutil.rmtree(cdir / "attack")
    if reuse_from and not grid.keep_checkpoints:
        shutil.rmtree(reuse_from)
    return done


def _attack_and_evaluate(cell: dict, target: str, reuse_from: str | None, model: str, grid: Grid,
                         cdir: Path) -> dict:
    if reuse_from:  # bitwise the same attack as on the unprotected model: reuse it, render with our decoder
        ckpts = _reuse_attack(Path(reuse_from), model, cdir / "attack", grid.budgets)
    else:
        ckpts = run_attack(target, attack_settings(grid, cell), cdir / "attack")
    eval_settings = EvalSettings(suite=grid.suite, **grid.eval)
    results = {}
    for ckpt in ckpts:
        step = int(ckpt.name.split("-")[1])
        latents_from = find_latents(cdir.parent.parent, generation_digest(ckpt), eval_settings)
        r = evaluate(str(ckpt), cdir / f"eval-step-{step}", eval_settings, latents_from=latents_from)
        results[step] = {k: r["metrics"][k] for k in ("unsafe_rate", "benign_class_match", "refusal_rate")
                         if k in r["metrics"]}
    return results


def find_latents(cells: Path, digest: str, settings: EvalSettings) -> Path | None:
    """A finished evaluation under `cells` whose saved latents this one would sample again."""
    want = json.loads(json.dumps(asdict(settings)))
    for f in sorted(cells.glob(f"*/*/eval-step-*/{LATENTS_FILE}")):
        if f.parent.name.endswith(".partial"):
            continue
        try:
            with safe_open(f, "pt") as fh:
                meta = fh.metadata() or {}
        except FileNotFoundError:  # a cell being redone by another worker removed it
            continue
        if meta.get("generation_digest") == digest and json.loads(meta.get("settings", "null")) == want:
            return f.parent
    return None


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


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold OUT/.lock: two sweeps in one directory would run the same cells."""
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {out}; wait for it or stop it first") from None
        yield


def run_sweep(model: str, grid: Grid, out: Path, unprotected: str = "patronus-tiny", workers: int = 1) -> dict:
    """Run (or resume) the sweep; returns and writes `sweep.json` with every evaluated cell.

    `workers` > 1 runs that many cells side by side in spawned processes, the CPU's threads
    shared out between them.
    """
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    try:
        check_grid(grid)
    except ValueError as e:
        raise SweepError(str(e)) from e
    out = Path(out)
    resolve_model(model)
    resolve_model(unprotected)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _check_same_sweep(out, grid, {"protected": str(resolve_model(model).resolve()),
                                      "unprotected": str(resolve_model(unprotected).resolve())})
        t0 = time.time()
        targets = {"protected": model}
        if "unprotected" in grid.references:
            targets["unprotected"] = unprotected
        names = [n for n in ("unprotected", "protected", "scratch") if n in targets or n in grid.references]
        share = "unprotected" in targets and same_unet_attack_inputs(model, unprotected)

        def cdir(name: str, cell: dict) -> Path:
            return out / "cells" / name / cell_id(cell)

        def shared(cell: dict) -> bool:
            return share and cell["kind"] in UNET_ONLY

        todo = [(name, cell) for cell in grid.cells() for name in names
                if not (cdir(name, cell) / "done.json").exists()]
        # An unprotected UNet-only attack is kept until its protected twin has used it.
        _remove_leftovers(out, grid, keep=lambda name, cell: name == "unprotected" and shared(cell)
                          and not (cdir("protected", cell) / "done.json").exists())
        for kind in sorted({cell["kind"] for name, cell in todo if name == "scratch"}):  # before any worker needs it
            targets[f"scratch-{kind}"] = str(make_scratch(unprotected, kind, out / "references" / f"scratch-{kind}"))
        # A protected UNet-only cell waits for its unprotected twin, whose attack it reuses (see above),
        # and runs as soon as the twin is done.
        pending_twin = {cell_id(c) for n, c in todo if n == "unprotected" and shared(c)}
        waiting = {cell_id(c): (n, c) for n, c in todo if n == "protected" and shared(c) and cell_id(c) in pending_twin}
        queue = deque(t for t in todo if not (t[0] == "protected" and cell_id(t[1]) in waiting))

        def job(name: str, cell: dict) -> tuple:  # the arguments of _run_cell
            source = cdir("unprotected", cell) / "attack"
            reuse_from = str(source) if shared(cell) and name == "protected" and source.is_dir() else None
            keep_attack = grid.keep_checkpoints or (shared(cell) and name == "unprotected")
            target = targets[f"scratch-{cell['kind']}" if name == "scratch" else name]
            return (name, cell, target, reuse_from, model, grid, cdir(name, cell), keep_attack,
                    None if workers == 1 else max(1, torch.get_num_threads() // workers))

        print(f"sweep: {len(grid.cells()) * len(names) - len(todo)} cells done, {len(todo)} to run"
              f"{f' on {workers} workers (logs in each cell dir)' if workers > 1 else ''}", flush=True)
        bar = tqdm(total=len(todo), desc="sweep cells", unit="cell", disable=not todo)
        pool = None if workers == 1 else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        running: dict[Future, tuple[str, dict]] = {}
        try:
            while queue or running:
                while queue and len(running) < workers:  # feed the workers one cell at a time, in queue order
                    name, cell = queue.popleft()
                    bar.set_postfix_str(f"{name} {cell_id(cell)}")
                    running[_submit(pool, job(name, cell))] = (name, cell)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name, cell = running.pop(fut)
                    if fut.exception() is not None:
                        bar.write(f"{name} {cell_id(cell)} failed ({fut.exception()!r}; traceback in "
                                  f"{cdir(name, cell) / 'log.txt'}); waiting for the running cells, then stopping")
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
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
        summary = sweep_summary(out) | {"wall_seconds_this_run": time.time() - t0}
        (out / "sweep.json").write_text(json.dumps(summary, indent=2))
        return summary


def _submit(pool: ProcessPoolExecutor | None, args: tuple) -> Future:
    """Run a cell in the pool, or here and now when there is no pool (one worker)."""
    if pool is not None:
        return pool.submit(_run_cell, *args)
    fut: Future = Future()
    fut.set_result(_run_cell(*args))  # an error propagates from here, with its traceback
    return fut


def _check_same_sweep(out: Path, grid: Grid, models: dict[str, str]) -> None:
    """Refuse to resume a sweep directory with another grid or other models; record them otherwise."""
    for name, ours in (("grid.json", asdict(grid)), ("models.json", models)):
        f = out / name
        if f.exists() and json.loads(f.read_text()) != json.loads(json.dumps(ours)):
            raise SweepError(f"{out} holds a sweep with a different {name.removesuffix('.json')} "
                             f"({f}); use a new --out")
        f.write_text(json.dumps(ours, indent=2))


def _remove_leftovers(out: Path, grid: Grid, keep: Callable[[str, dict], bool]) -> None:
    """Delete checkpoints of finished cells that a killed run did not get to delete."""
    if grid.keep_checkpoints:
        return
    for attack in out.glob("cells/*/*/attack"):
        done = attack.parent / "done.json"
        if done.exists():
            d = json.loads(done.read_text())
            if not keep(d["model"], d["cell"]):
                shutil.rmtree(attack)


def sweep_summary(out: Path) -> dict:
    """The grid and every finished cell of a sweep directory (also of one still running)."""
    out = Path(out)
    if not (out / "grid.json").is_file():
        raise SweepError(f"{out} is not a sweep directory (no grid.json)")
    done_files = sorted((out / "cells").glob("*/*/done.json"))
    summary = {"grid": json.loads((out / "grid.json").read_text()),
               "cells": [json.loads(p.read_text()) for p in done_files]}
    # Over every session that worked on this sweep: the sum of its cells' attack + evaluation
    # times, and the wall time during which at least one cell was running.
    summary["cell_seconds_total"] = sum(c.get("seconds", 0.0) for c in summary["cells"])
    summary["wall_seconds_total"] = busy_seconds(summary["cells"], done_files)
    return summary

"""The field grid: every defence under every attack at one standard budget, in one table.

A field grid file names defences (rows) and attacks (columns, each with its own optimizer,
lr and steps). `run_field` builds each defence from the unprotected model once
(`OUT/defences/NAME`, with the defence's own `protect`), then runs every (defence, attack) cell
exactly as the robustness sweep runs its cells (`cell.run_cell`: attack, evaluate the final
checkpoint, done.json; resumable, locked, workers), plus a scratch reference for every attack
that trains weights. Defences:

    none              the unprotected model (the "unprotected original" reference)
    negative-prompt, checker, sld, esd, uce   the baselines (defenses/baselines), default
                      presets unless `presets` says otherwise
    patronus          the model given to `patronus sweep` (the protection as shipped)
    patronus-decoder  that model with the unprotected UNet put back: its decoder half alone
    patronus-unet     that model with the unprotected VAE put back: its UNet half alone (what
                      `--parts unet` gives); with the two rows above, the stage ablation. The
                      decoder half is what `--parts decoder` gives only when the decoder's bank
                      holds the original UNet's latents alone (`bank.unet_sources`, the quick
                      preset); the full preset's decoder also learned the aligned UNet's latents.

`swap-decoder` puts the unprotected model's VAE in. The first column should be `none`
(the model as published): it is also evaluated against the unprotected model (PSNR/SSIM), which
gives the table's benign-quality columns.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACKS
from patronus.config import build, read_config_file, to_dict
from patronus.defenses import load_defense
from patronus.errors import ConfigError
from patronus.evaluation.harness import EvalConfig, resolve_prompts
from patronus.io import atomic_dir, locked_dir
from patronus.models.registry import check_no_pickles, resolve_model
from patronus.provenance import weight_hashes
from patronus.sweep.cell import CellJob, make_scratch
from patronus.sweep.executors import ExecutorConfig, make_executor
from patronus.sweep.grid import GridConfig, grid_from_dict, grid_path
from patronus.sweep.layout import NOT_ON_REFERENCES, SweepError, SweepLayout, cell_id, kind_name
from patronus.sweep.results import sweep_summary
from patronus.sweep.runner import check_source, models_record, run_cells

FIELD_DEFENCES = ("none", "negative-prompt", "checker", "sld", "esd", "uce", "patronus-decoder", "patronus-unet",
                  "patronus")
HALVES = {"patronus-decoder": ("decoder", "unet"), "patronus-unet": ("unet", "vae")}  # row: (half kept, part put back)
BASELINES = ("negative-prompt", "checker", "sld", "esd", "uce")
# FieldAttack settings that came after field sweeps existed: a saved attack without them had these.
ADDED_ATTACK_SETTINGS: dict[str, object] = {"schedule": "constant", "freeze_text_encoder": False,
                                             "max_grad_norm": None}


@dataclass(frozen=True)
class FieldAttack:
    """One column: an attack kind and its settings (ignored by the one-shot kinds)."""

    kind: str
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 500
    rank: int | None = None  # LoRA kinds: default 8
    sampler_steps: int = 5
    schedule: str = "constant"  # or "step": lr x0.1 at 25%, 50% and 75% of `steps`
    freeze_text_encoder: bool = False  # joint: the UNet and decoder only
    max_grad_norm: float | None = None  # the fine-tuning kinds: clip each step's gradient (diffusers' scripts: 1.0)

    def cell(self, seed: int) -> dict:
        one_shot = ATTACKS[self.kind].one_shot
        rank = (self.rank or 8) if ATTACKS[self.kind].lora else None
        return ({"kind": self.kind, "rank": rank, "optimizer": None if one_shot else self.optimizer,
                 "lr": None if one_shot else self.lr, "seed": seed}
                | ({"schedule": self.schedule} if self.schedule != "constant" and not one_shot else {})
                | ({"freeze_text_encoder": True} if self.freeze_text_encoder else {})
                | ({"max_grad_norm": self.max_grad_norm} if self.max_grad_norm is not None else {}))

    def config(self, grid: FieldGridConfig, unprotected: str) -> AttackConfig:
        one_shot = ATTACKS[self.kind].one_shot
        return AttackConfig(kind=self.kind, data=grid.data, optimizer=self.optimizer, lr=self.lr,
                            steps=1 if one_shot else self.steps, save_at=() if one_shot else (self.steps,),
                            rank=self.rank or 8, batch_size=grid.batch_size, seed=grid.seed,
                            swap_from=unprotected if self.kind == "swap-decoder" else None,
                            sampler_steps=self.sampler_steps, schedule=self.schedule,
                            freeze_text_encoder=self.freeze_text_encoder, max_grad_norm=self.max_grad_norm)


@dataclass(frozen=True)
class FieldGridConfig:
    attacks: tuple[FieldAttack, ...]
    defences: tuple[str, ...] = FIELD_DEFENCES
    presets: dict = field(default_factory=dict)  # baseline -> preset (default: the baseline's own)
    scratch: bool = True  # a scratch reference for every attack that trains weights
    # A row for the data-filtered model (`run_field(filtered=...)`, trained without unsafe
    # content) under every attack: the reference any post-training defence is measured against.
    filtered: bool = False
    batch_size: int = 16
    data: str = "attacker"
    suite: str = "glyph"
    seed: int = 0
    eval: dict = field(default_factory=dict)  # extra EvalConfig fields (steps, guidance, ...)

    def __post_init__(self):
        if not self.attacks or not self.defences:
            raise ConfigError("a field grid needs at least one attack and one defence")
        if unknown := set(self.defences) - set(FIELD_DEFENCES):
            raise ConfigError(f"unknown defence(s) {', '.join(sorted(unknown))}; "
                              f"choose from {', '.join(FIELD_DEFENCES)}")
        if unknown := set(self.presets) - set(BASELINES):
            raise ConfigError(f"presets apply to the baselines ({', '.join(BASELINES)}), "
                              f"not {', '.join(sorted(unknown))}")
        for name, preset in self.presets.items():
            load_defense(name).load_config(preset)  # raises on an unknown preset
        ids = [cell_id(a.cell(self.seed)) for a in self.attacks]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"a field grid lists the same attack twice: {', '.join(ids)}")
        for a in self.attacks:
            a.config(self, "patronus-tiny")  # raises on a bad kind, optimizer, schedule, lr or steps
            if a.schedule != "constant" and ATTACKS[a.kind].one_shot:
                raise ConfigError(f"attack {a.kind} trains nothing: a learning-rate schedule does not apply to it")
        resolve_prompts(self.eval_config())

    def eval_config(self) -> EvalConfig:
        return EvalConfig(suite=self.suite, **self.eval)



def is_field_grid(values: dict) -> bool:
    return "attacks" in values or "defences" in values


def field_grid_from_dict(values: dict, source: str | Path) -> FieldGridConfig:
    """A checked field grid from a grid file's settings (or a field sweep's grid.json)."""
    values = {k: v for k, v in values.items() if k != "field"}
    attacks = values.pop("attacks", [])
    try:
        if not isinstance(attacks, list) or not all(isinstance(a, dict) for a in attacks):
            raise ConfigError("`attacks` must be a list of tables ([[attacks]] in TOML)")
        built = tuple(build(FieldAttack, a, "attack") for a in attacks)
        return build(FieldGridConfig, values | {"attacks": built}, "field grid")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def load_sweep_grid(path: str | Path) -> GridConfig | FieldGridConfig:
    """A robustness grid or a field grid (it names `attacks` or `defences`): a file or a shipped name."""
    path = grid_path(path)
    values = read_config_file(path, "grid")
    return field_grid_from_dict(values, path) if is_field_grid(values) else grid_from_dict(values, path)


def _derive_half(model: str, unprotected: str, out: Path, keep: str, put_back: str) -> None:
    """`model` with `unprotected`'s `put_back` folder (unet or vae) put back: its `keep` half alone."""
    src, base = resolve_model(model), resolve_model(unprotected)
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(put_back))
        shutil.copytree(base / put_back, tmp / put_back)
        info = json.loads((src / "patronus.json").read_text()) if (src / "patronus.json").is_file() else {}
        hashes, original = weight_hashes(tmp), weight_hashes(base)
        info |= {"parts": [keep], "derived": f"{src} with the {put_back} of {base} put back (its {keep} half alone)",
                 "weight_files_sha256": hashes,
                 "changed_weight_files": sorted(k for k in hashes if hashes[k] != original.get(k))}
        (tmp / "patronus.json").write_text(json.dumps(info, indent=2))


def build_defences(grid: FieldGridConfig, model: str, unprotected: str, layout: SweepLayout) -> dict[str, str]:
    """Every row's pipeline directory, building the missing ones (a killed build leaves nothing)."""
    paths = {}
    for name in grid.defences:
        if name == "none":
            paths[name] = unprotected
        elif name == "patronus":
            paths[name] = model
        else:
            out = layout.defence(name)
            if not (out / "model_index.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                print(f"field: building the {name} defence from {unprotected} -> {out}", flush=True)
                if name in HALVES:
                    _derive_half(model, unprotected, out, *HALVES[name])
                else:
                    defense = load_defense(name)
                    cfg = defense.load_config(grid.presets.get(name, defense.DEFAULT_PRESET))
                    defense.protect(unprotected, out, cfg, out.with_name(out.name + ".work"))
            paths[name] = str(out)
    return paths


def _with_added_settings(saved: dict) -> dict:
    """A field sweep's saved grid.json with the attack settings added since at the values it ran with."""
    if isinstance(saved.get("attacks"), list):
        saved = saved | {"attacks": [ADDED_ATTACK_SETTINGS | a if isinstance(a, dict) else a
                                     for a in saved["attacks"]]}
    return saved


def _check_same_field(layout: SweepLayout, grid: FieldGridConfig, models: dict) -> None:
    saved = {"field": True} | to_dict(grid)
    for path, want, what in ((layout.grid_file, saved, "grid"), (layout.models_file, models, "models")):
        if path.exists() and _with_added_settings(json.loads(path.read_text())) != json.loads(json.dumps(want)):
            raise SweepError(f"{layout.root} holds a sweep of another {what} (other settings, or a model with "
                              "other weights); use a new --out")
        path.write_text(json.dumps(want, indent=2))


def run_field(model: str, grid: FieldGridConfig, out: Path, unprotected: str = "patronus-tiny",
              workers: int = 1, executor: ExecutorConfig = ExecutorConfig(),
              filtered: str = "patronus-tiny-filtered") -> dict:
    """Run (or resume) the field grid; returns and writes `sweep.json` with every finished cell."""
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    layout = SweepLayout(out)
    references = {"filtered": filtered} if grid.filtered else {}
    for m in (model, unprotected, *references.values()):
        check_no_pickles(resolve_model(m))
    check_source(model, unprotected)
    out.mkdir(parents=True, exist_ok=True)
    with locked_dir(out, f"another sweep is running in {out}; wait for it or stop it first"):
        _check_same_field(layout, grid, models_record(model, unprotected, references))
        targets = build_defences(grid, model, unprotected, layout) | references
        jobs = []
        for attack in grid.attacks:
            cell, cfg = attack.cell(grid.seed), attack.config(grid, unprotected)
            rows = (list(grid.defences) + (["scratch"] if grid.scratch and ATTACKS[attack.kind].trains else [])
                    + [r for r in references if attack.kind not in NOT_ON_REFERENCES])
            for name in rows:
                target = (str(make_scratch(unprotected, attack.kind, layout.scratch(kind_name(cell)),
                                           freeze_text_encoder=attack.freeze_text_encoder))
                          if name == "scratch" else targets[name])
                jobs.append(CellJob(model_name=name, cell=cell, target=target, vae_from=target, grid=None,
                                    sweep_root=out, attack=cfg, settings=grid.eval_config(),
                                    reference=unprotected if attack.kind == "none" else None))
        todo = deque(j for j in jobs if not layout.cell(j.model_name, j.cell).done.exists())
        print(f"field: {len(jobs) - len(todo)} cells done, {len(todo)} to run", flush=True)
        bar = tqdm(total=len(todo), desc="field cells", unit="cell", disable=not todo)
        run_cells(todo, lambda job: job, make_executor(workers, executor), bar, lambda job, done: None)
        summary = sweep_summary(out) | {"field": {"defences": list(grid.defences), "models": targets,
                                                  "attacks": [asdict(a) for a in grid.attacks],
                                                  "finished": time.time()}}
        layout.summary_file.write_text(json.dumps(summary, indent=2))
    return summary

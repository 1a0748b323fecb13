"""One sweep cell: attack one model with one grid cell (or reuse a twin's attack), evaluate every checkpoint.

A UNet-only attack reads nothing of the decoder, so two models that differ only there share
it: the cell takes its twin's attacked pipelines with its own VAE put in (`attack_reused_from`
in done.json). The protected model's twin is the unprotected one when `patronus protect` left
the UNet, text encoder, tokenizer, scheduler and VAE encoder bitwise alone (a decoder-only
protection); the `original-vae` reference (the protected model with the original VAE put back)
always reuses the protected model's attack.

Sampled latents depend only on the files outside `vae/` (the evaluation's generation
digest). An evaluation whose digest and settings match one already in the sweep decodes
that one's saved latents with its own decoder instead of sampling them again
(`timing.latents_from` in its metrics.json). That covers every cell that reused an attack
and every checkpoint of a decoder-full attack after its cell's first (the UNet is untouched).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACK_PROMPTS, ATTACKS, run_attack
from patronus.evaluation.harness import LATENTS_FILE, EvalConfig, evaluate
from patronus.models.components import reinitialise
from patronus.models.registry import load_pipeline, pickle_allowed, resolve_model
from patronus.provenance import generation_digest
from patronus.sweep.grid import GridConfig, attack_config
from patronus.sweep.layout import CellLayout, SweepError, SweepLayout, step_of

RESULT_METRICS = ("unsafe_rate", "benign_class_match", "refusal_rate", "false_refusal_rate", "frechet_glyphnet",
                  "psnr_vs_reference")


@dataclass(frozen=True)
class CellJob:
    """Everything one cell needs, picklable for a worker process."""

    model_name: str  # one of layout.MODELS
    cell: dict
    target: str  # the pipeline to attack
    vae_from: str  # the model whose VAE goes into a reused attack
    grid: GridConfig | None  # the robustness grid of the cell (None: a field cell, with `attack` and `settings`)
    sweep_root: Path
    reuse_from: tuple[str, str] | None = None  # (twin's model name, its attack directory)
    keep_attack: bool = False
    attack: AttackConfig | None = None  # the attack to run; default: the grid's for this cell
    settings: EvalConfig | None = None  # how to evaluate; default: the grid's
    reference: str | None = None  # evaluate with PSNR/SSIM of benign images against this model
    threads: int | None = None  # set in worker processes: torch threads, output to the cell's log


def run_cell(job: CellJob) -> dict:
    """Run the cell and write its done.json; returns what done.json holds.

    With `threads` set it runs in a worker process: torch gets that many threads and the
    attack's and evaluation's progress bars (and a traceback, if it fails) go to the cell's
    log.txt instead of the terminal.
    """
    t_cell = time.time()
    cell = SweepLayout(job.sweep_root).cell(job.model_name, job.cell)
    shutil.rmtree(cell.root, ignore_errors=True)
    cell.root.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if job.threads is not None:
            torch.set_num_threads(job.threads)
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(cell.log, "w"))))
        try:
            results = _attack_and_evaluate(job, cell)
        except Exception:
            traceback.print_exc()
            raise
    done = {"model": job.model_name, "cell": job.cell, "results": results, "seconds": time.time() - t_cell,
            "finished": time.time(), "attack_reused_from": job.reuse_from[0] if job.reuse_from else None}
    tmp = cell.done.with_name("done.json.partial")
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(cell.done)  # a cell is done when done.json exists: never half-written
    # Only now the checkpoints go; a kill in between leaves files that the next run removes.
    # A twin's checkpoints are removed by the runner once every cell reusing them is done.
    if not job.keep_attack:
        shutil.rmtree(cell.attack)
    return done


def _attack_and_evaluate(job: CellJob, cell: CellLayout) -> dict:
    if job.reuse_from:  # bitwise the same attack as on the twin: reuse it, render with our decoder
        ckpts = _reuse_attack(Path(job.reuse_from[1]), job.vae_from, cell.attack, job.grid.budgets)
    else:
        ckpts = run_attack(job.target, job.attack or attack_config(job.grid, job.cell), cell.attack)
    results = {}
    for ckpt in ckpts:
        step = step_of(ckpt)
        settings = job.settings or job.grid.eval_config()
        if (ckpt / ATTACK_PROMPTS).is_file():  # a prompt-space attack: ask the way it says
            settings = replace(settings, prompt_rewrite=json.loads((ckpt / ATTACK_PROMPTS).read_text()))
        latents_from = find_latents(SweepLayout(job.sweep_root), generation_digest(ckpt), settings)
        r = evaluate(str(ckpt), cell.eval(step), settings, reference=job.reference,
                     latents_from=latents_from)
        results[step] = {k: r["metrics"][k] for k in RESULT_METRICS if k in r["metrics"]}
    return results


def find_latents(layout: SweepLayout, digest: str, settings: EvalConfig) -> Path | None:
    """A finished evaluation in the sweep whose saved latents this one would sample again."""
    want = json.loads(json.dumps(asdict(settings)))
    for f in layout.evaluations_with(LATENTS_FILE):
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


def _reuse_attack(source: Path, model: str, out: Path, budgets: tuple[int, ...]) -> list[Path]:
    """A twin's attacked checkpoints with `model`'s VAE put in."""
    vae = resolve_model(model) / "vae"
    ckpts = sorted(source.glob("step-*"), key=step_of)
    if [step_of(c) for c in ckpts] != sorted(budgets):
        raise SweepError(f"{source} holds checkpoints {[step_of(c) for c in ckpts]}, expected {sorted(budgets)}; "
                         f"delete it to rerun")
    for ckpt in ckpts:
        shutil.copytree(ckpt, out / ckpt.name, ignore=shutil.ignore_patterns("vae"))
        shutil.copytree(vae, out / ckpt.name / "vae")
    return [out / c.name for c in ckpts]


def make_scratch(model: str, kind: str, out: Path, seed: int = 0, freeze_text_encoder: bool = False) -> Path:
    """The original pipeline with the components attack `kind` trains re-initialised at random
    (with `freeze_text_encoder`, the text encoder, which the attack then leaves alone, kept)."""
    if out.exists():
        return out
    pipe = load_pipeline(model)
    trains = ATTACKS[kind].trains - ({"text_encoder"} if freeze_text_encoder else set())
    for name, module in reinitialise(pipe.components, trains, seed).items():
        setattr(pipe, name, module)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_original_vae(model: str, unprotected: str, out: Path) -> Path:
    """`model` with `unprotected`'s VAE put back (the `swap-decoder` attack), as a sweep reference."""
    if not (out / "step-0").exists():
        shutil.rmtree(out, ignore_errors=True)  # a killed swap's leftovers
        run_attack(model, AttackConfig(kind="swap-decoder", swap_from=unprotected, steps=1, save_at=()), out,
                   progress=False)
    return out / "step-0"


def same_unet_attack_inputs(a: str, b: str) -> bool:
    """Whether a UNet-only attack computes the same thing on both pipelines, and renders it the
    same way but for the decoder.

    Such an attack reads the UNet, text encoder, tokenizer, scheduler and the VAE *encoder*
    (for the latents of its images); the decoder only renders the results. A decoder-only
    protection (`patronus protect --parts decoder`) shares the attack with its original exactly;
    one that aligned the UNet does not, nor does one that changed how the pipeline is called
    (a safety checker, a negative prompt, SLD: every file outside vae/ must be the same).
    """
    ra, rb = resolve_model(a), resolve_model(b)
    if generation_digest(ra) != generation_digest(rb):
        return False
    safe = None if pickle_allowed() else True
    va, vb = (AutoencoderKL.from_pretrained(r / "vae", use_safetensors=safe) for r in (ra, rb))
    # Everything but the decoder head: the encoder, and quant_conv where the VAE has one.
    ea, eb = ({k: v for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
              for vae in (va, vb))
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)

"""The `patronus` command line: a thin layer over the package's stages; `protect`, `evaluate`,
`attack` and `sweep` call the Python API (`patronus.api`) with the flags' values.

A model is a shipped name, a pipeline directory or a Hugging Face Hub id (`org/name`). The
command line runs with HF_HUB_OFFLINE=1 unless the environment says otherwise, so a Hub id is
read from the Hub cache (`--cache-dir`, HF_HUB_CACHE) and never downloaded behind the user's back.

Bad input (a missing model, a directory that is not a pipeline, corrupt weights, an
existing output directory, a bad setting) raises a `PatronusError`, which ends with one line
on stderr and exit code 2, never a traceback. Flag defaults are read from the `*Config`
dataclasses, so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from patronus.config import default
from patronus.errors import PatronusError

EXIT_BAD_INPUT = 2
MODEL_HELP = "a pipeline directory, a shipped model's name (patronus-tiny) or a Hugging Face Hub id (org/name)"


class UsageError(PatronusError):
    """A command-line value the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad choice, missing argument) as one line, exit 2,
    like every other bad input, instead of the usage block."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def cmd_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from patronus.imaging import grid
    from patronus.io import atomic_dir
    from patronus.models.inference import read_inference
    from patronus.models.registry import load_pipeline, resolve_model
    from patronus.models.sampling import generate

    if args.n < 1 or args.steps < 1:
        raise UsageError("--n and --steps must be at least 1")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UsageError("--guidance must be a finite number >= 0 (1 or less turns classifier-free guidance off)")
    seeds = [args.seed + i for i in range(args.n)]
    with atomic_dir(args.out) as tmp:
        pipe = load_pipeline(args.model)
        inference = read_inference(resolve_model(args.model))
        images = generate(pipe, [args.prompt] * args.n, seeds, steps=args.steps, guidance=args.guidance,
                          progress=True, inference=inference)
        for seed, img in zip(seeds, images):
            Image.fromarray(img).save(tmp / f"{seed:06d}.png")
        grid(images, cols=min(8, args.n), upscale=4).save(tmp / "grid.png")
        settings = {"model": args.model, "prompt": args.prompt, "seeds": seeds, "steps": args.steps,
                    "guidance": args.guidance, "sampler": type(pipe.scheduler).__name__}
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {args.n} images and {Path(args.out) / 'grid.png'}")


def cmd_verify(args: argparse.Namespace) -> None:
    from patronus.verify import verify

    result = verify(args.model)
    print(result.summary())
    if not result.intact:
        sys.exit(1)


def cmd_train_glyphnet(args: argparse.Namespace) -> None:
    from patronus.detectors.glyphnet import GlyphNetTrainConfig, evaluate_glyphnet, train_glyphnet
    from patronus.io import atomic_dir

    cfg = GlyphNetTrainConfig(steps=args.steps, seed=args.seed)
    t0 = time.time()
    with atomic_dir(args.out) as tmp:
        net = train_glyphnet(cfg)
        net.save_pretrained(tmp)
    print(f"trained in {time.time() - t0:.0f} s; held-out metrics: {json.dumps(evaluate_glyphnet(net))}")


def cmd_train_base(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from patronus.models.train_base import load_train_config, train_base

    cfg = load_train_config(args.config)
    t0 = time.time()
    result = train_base(Path(args.workdir), cfg, stage=args.stage)
    if PartialState().is_main_process:
        print(f"stage {args.stage} done in {time.time() - t0:.0f} s" + (f"; pipeline at {result}" if result else ""))


def cmd_export_split(args: argparse.Namespace) -> None:
    from patronus.world.splits import export_imagefolder

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    if args.resolution < 8:
        raise UsageError(f"--resolution must be at least 8 pixels, got {args.resolution}")
    out = export_imagefolder(args.split, args.n, Path(args.out), resolution=args.resolution)
    print(f"wrote {args.n} images and metadata.jsonl to {out}")


def _read_rewrite(path: str | None) -> dict | None:
    """A prompt-space attack's attack-prompts.json, or a clear error."""
    from patronus.evaluation.suites import PromptFileError

    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptFileError(f"--attack-prompts {path} is not a readable JSON file ({e.__class__.__name__}); "
                              f"give the attack-prompts.json of a prompt-space attack's checkpoint") from e


def _rgb(text: str) -> tuple[int, ...]:
    """`--refusal-rgb 150,150,150` as a tuple; the range is checked by EvalConfig."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three integers R,G,B (e.g. 150,150,150)") from None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from patronus.api import evaluate
    from patronus.evaluation.harness import EvalConfig

    settings = EvalConfig(
        suite=None if (args.unsafe_prompts or args.benign_prompts) else args.suite,
        unsafe_prompts=args.unsafe_prompts, benign_prompts=args.benign_prompts, detector=args.detector,
        n_per_prompt=args.n_per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size, prompt_rewrite=_read_rewrite(args.attack_prompts), vae_slicing=args.vae_slicing,
        refusal=args.refusal, refusal_rgb=args.refusal_rgb,
    )
    result = evaluate(args.model, args.out, settings, reference=args.reference).record
    m, t = result["metrics"], result["timing"]
    print(f"{t['images']} images in {t['generation_seconds']:.1f} s ({t['images_per_s']:.1f} images/s)")
    for key in ("unsafe_rate", "refusal_rate", "false_refusal_rate", "benign_class_match", "benign_color_match",
                "frechet_glyphnet", "psnr_vs_reference", "ssim_vs_reference"):
        if key in m:
            v = m[key]
            print(f"  {key:22s} {v['value']:.4f}  [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]  n={v['n']}")
    print(f"wrote {args.out}/metrics.json, records.jsonl and images/")


def cmd_protect(args: argparse.Namespace) -> None:
    from patronus.api import protect

    result = protect(args.model, args.out, defense=args.defense, preset=args.preset, config=args.config,
                     parts=args.parts, workdir=args.workdir, resume=args.resume)
    changed = ", ".join(result.changed_weight_files) or "no weight file"
    print(f"protected pipeline: {result.path} (changed: {changed})")
    print("\n".join(result.describe()))


def cmd_attack(args: argparse.Namespace) -> None:
    from patronus.api import attack
    from patronus.attacks.config import AttackConfig

    try:
        save_at = tuple(int(x) for x in args.save_at.split(",")) if args.save_at else (args.steps,)
    except ValueError as e:
        raise UsageError(f"--save-at must be comma-separated step numbers, got {args.save_at!r}") from e
    cfg = AttackConfig(kind=args.kind, data=args.data, optimizer=args.optimizer, lr=args.lr, steps=args.steps,
                       rank=args.rank, batch_size=args.batch_size, save_at=save_at, seed=args.seed,
                       swap_from=getattr(args, "from"), swap_part=args.swap_part, then=args.then,
                       sampler_steps=args.sampler_steps, guidance=args.guidance, schedule=args.schedule,
                       freeze_text_encoder=args.freeze_text_encoder, max_grad_norm=args.max_grad_norm,
                       gradient_checkpointing=args.gradient_checkpointing, vae_slicing=args.vae_slicing)
    result = attack(args.model, args.out, cfg)
    print("attacked pipelines:\n" + "\n".join(f"  {d}" for d in result.checkpoints))


def cmd_sweep(args: argparse.Namespace) -> None:
    from patronus.api import sweep
    from patronus.report import ratio_text
    from patronus.sweep.entry import as_grid
    from patronus.sweep.executors import ExecutorConfig
    from patronus.sweep.grid import GridConfig

    executor = ExecutorConfig(args.executor, args.cpus_per_cell, args.gpus_per_cell)
    grid = as_grid(args.grid)
    t0 = time.time()
    summary = sweep(args.model, args.out, grid, unprotected=args.unprotected, filtered=args.filtered,
                    workers=args.workers, executor=executor).results
    if isinstance(grid, GridConfig) and (ratios := ratio_text(summary)):
        print(ratios + f"\n(tables and plots: patronus report {args.out} --out REPORT_DIR)")
    print(f"{len(summary['cells'])} cells in {args.out}/sweep.json; this run took {(time.time() - t0) / 60:.1f} min, "
          f"all cells so far {summary['cell_seconds_total'] / 3600:.2f} h of attacks and evaluations, "
          f"{summary['wall_seconds_total'] / 3600:.2f} h of wall time")


def cmd_report(args: argparse.Namespace) -> None:
    from patronus.report import build_report

    path = build_report([Path(d) for d in args.runs], Path(args.out))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def cmd_demo(args: argparse.Namespace) -> None:
    from patronus.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    from patronus.attacks.config import AttackConfig
    from patronus.attacks.registry import ATTACKS
    from patronus.defenses import DEFENSES
    from patronus.detectors.glyphnet import GlyphNetTrainConfig
    from patronus.evaluation.harness import REFUSALS, EvalConfig
    from patronus.models.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from patronus.training import OPTIMIZERS, SCHEDULES

    p = _Parser(prog="patronus", description="Protect text-to-image models against white-box misuse.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.ckpt pickle weights (with weights_only=True); only for models you trust")
    p.add_argument("--cache-dir", help="the Hugging Face Hub cache that Hub ids (org/name) are read from and "
                                       "downloaded to (sets HF_HUB_CACHE; default ~/.cache/huggingface/hub)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="sample images from a pipeline directory or `patronus-tiny`")
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("prompt")
    g.add_argument("--n", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    g.add_argument("--out", default="out/generate")
    g.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="measure unsafe rate, refusals and benign quality of a model")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--out", required=True)
    ev.add_argument("--reference", help="second model for PSNR/SSIM of benign outputs at the same seeds")
    ev.add_argument("--suite", default=default(EvalConfig, "suite"),
                    help="glyph (default), glyph-quick, or new-words (the benign fine-tuning task)")
    ev.add_argument("--unsafe-prompts", help="a .txt (one per line) or I2P-style .csv prompt file")
    ev.add_argument("--benign-prompts", help="a .txt or .csv prompt file (e.g. COCO captions)")
    ev.add_argument("--detector", choices=["glyphnet", "nudenet"], default=default(EvalConfig, "detector"))
    ev.add_argument("--n-per-prompt", type=int, default=default(EvalConfig, "n_per_prompt"))
    ev.add_argument("--seed", type=int, default=default(EvalConfig, "seed"))
    ev.add_argument("--steps", type=int, default=default(EvalConfig, "steps"))
    ev.add_argument("--guidance", type=float, default=default(EvalConfig, "guidance"))
    ev.add_argument("--batch-size", type=int, default=default(EvalConfig, "batch_size"))
    ev.add_argument("--attack-prompts", help="a prompt-space attack's attack-prompts.json (in its checkpoint): "
                                             "ask for the unsafe classes by learned token, or in every wording")
    ev.add_argument("--vae-slicing", action="store_true", help="decode one image at a time (less memory)")
    ev.add_argument("--refusal", choices=list(REFUSALS), default=default(EvalConfig, "refusal"),
                    help="a refusal is a near-black image (black, default), near the model's own VAE's rendering "
                         "of its refusal latent (rendered: for an aligned UNet on a VAE without the moderator), or "
                         "near a plain --refusal-rgb image (plain: a refusal latent fitted to the decoder)")
    ev.add_argument("--refusal-rgb", type=_rgb, default=default(EvalConfig, "refusal_rgb"), metavar="R,G,B",
                    help="the colour of the plain image whose latent the UNet refuses with (unet.refusal_rgb; "
                         "default 0,0,0: black), with --refusal rendered or plain")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("protect", help="harden a model with a defence (default: Patronus, decoder moderator and "
                                        "aligned UNet)")
    pr.add_argument("model", help=MODEL_HELP)
    pr.add_argument("--out", required=True)
    pr.add_argument("--config", help="a .toml, .yaml or .json file overriding the preset")
    pr.add_argument("--defense", choices=list(DEFENSES), default="patronus")
    pr.add_argument("--preset", help="the defence's preset (patronus: quick or full, default full; sld: weak, "
                                     "medium, strong or max, default medium; esd: esd-x or esd-u, default esd-x; "
                                     "the others: default)")
    pr.add_argument("--workdir", help="checkpoints and the feature-bank cache (default: OUT.work)")
    pr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    pr.add_argument("--parts", help="patronus: what to harden, comma-separated: decoder, unet "
                                    "(default: the config's, both)")
    pr.set_defaults(func=cmd_protect)

    at = sub.add_parser("attack", help="fine-tune or swap components the way a white-box adversary would")
    at.add_argument("model", help=MODEL_HELP)
    at.add_argument("--kind", required=True,
                    help="; ".join(f"{k}: {a.help}" for k, a in ATTACKS.items()))
    at.add_argument("--data", default=default(AttackConfig, "data"),
                    help="'attacker' (glyph split, unsafe), 'new-words' (the benign task) or an image folder "
                         "with metadata.jsonl")
    at.add_argument("--optimizer", default=default(AttackConfig, "optimizer"),
                    help=f"{', '.join(OPTIMIZERS)} (sgd with momentum 0.9)")
    at.add_argument("--lr", type=float, default=default(AttackConfig, "lr"))
    at.add_argument("--schedule", choices=list(SCHEDULES), default=default(AttackConfig, "schedule"),
                    help="learning rate: constant, or step (x0.1 after 25%%, 50%% and 75%% of --steps)")
    at.add_argument("--steps", type=int, default=default(AttackConfig, "steps"))
    at.add_argument("--rank", type=int, default=default(AttackConfig, "rank"), help="LoRA rank for *-lora kinds")
    at.add_argument("--batch-size", type=int, default=default(AttackConfig, "batch_size"))
    at.add_argument("--save-at", help="comma-separated steps to save at (default: the last step)")
    at.add_argument("--seed", type=int, default=default(AttackConfig, "seed"))
    at.add_argument("--from", help="swap-decoder: the pipeline whose VAE is put in")
    at.add_argument("--swap-part", choices=["vae", "decoder"], default=default(AttackConfig, "swap_part"),
                    help="swap-decoder: put in the whole VAE, or only its decoder (keeping this model's encoder)")
    at.add_argument("--then", help="swap-decoder: follow with unet-full or unet-lora")
    at.add_argument("--sampler-steps", type=int, default=default(AttackConfig, "sampler_steps"),
                    help="soft-prompt: DDIM steps of the differentiable sampler it optimises through")
    at.add_argument("--guidance", type=float, default=default(AttackConfig, "guidance"),
                    help="soft-prompt: classifier-free guidance of that sampler")
    at.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (less memory, about a third slower)")
    at.add_argument("--vae-slicing", action="store_true", help="encode the attacker's images one at a time")
    at.add_argument("--freeze-text-encoder", action="store_true", help="joint: train the UNet and decoder only")
    at.add_argument("--max-grad-norm", type=float, default=default(AttackConfig, "max_grad_norm"),
                    help="clip each step's gradient to this global norm, as diffusers' training scripts do "
                         "(their default: 1.0; default here: no clipping)")
    at.add_argument("--out", required=True)
    at.set_defaults(func=cmd_attack)

    sw = sub.add_parser("sweep", help="attack grid on a model and its references (unprotected, scratch, filtered)")
    sw.add_argument("model", help="the (protected) model: " + MODEL_HELP)
    sw.add_argument("--grid", default="default",
                    help="a grid .toml/.yaml, or a shipped grid: default, quick, new-words, field, field-quick")
    sw.add_argument("--unprotected", default="patronus-tiny",
                    help="the original model (unprotected reference); for a protected model, the one it was "
                         "made from (its patronus.json's source_model)")
    sw.add_argument("--filtered", default="patronus-tiny-filtered",
                    help="the model trained without unsafe content (the `filtered` reference, where the grid names it)")
    sw.add_argument("--out", required=True, help="sweep directory; rerun the same command to resume")
    sw.add_argument("--workers", type=int, default=1,
                    help="cells run at once: local, in separate processes (CPU threads shared out between them); "
                         "ray, as Ray tasks")
    sw.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: this machine's process pool; ray: each cell a Ray task (RAY_ADDRESS or a local "
                         "instance; pip install -e '.[ray]')")
    sw.add_argument("--cpus-per-cell", type=float, default=1.0, help="ray: CPUs each cell's task holds")
    sw.add_argument("--gpus-per-cell", type=float, default=0.0, help="ray: GPUs each cell's task holds")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="turn evaluation runs and sweeps into report.md and a self-contained "
                        "report.html")
    rp.add_argument("runs", nargs="+", help="directories written by `patronus evaluate` or `patronus sweep` (also one "
                    "still running), or decoder-attack results (benchmarks/moderator.py)")
    rp.add_argument("--out", required=True)
    rp.set_defaults(func=cmd_report)

    v = sub.add_parser("verify", help="check a protected pipeline against its patronus.json "
                                      "(exit 0 intact, 1 differs, 2 not a protected pipeline)")
    v.add_argument("model", help="a protected pipeline directory, a shipped protected model's name or a Hub id")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="the end-to-end demo on the shipped model")
    d.add_argument("--out", default="out/demo")
    d.set_defaults(func=cmd_demo)

    tb = sub.add_parser("train-base", help="train patronus-tiny from scratch (checkpoints; rerun to resume)")
    tb.add_argument("--workdir", default="runs/base")
    tb.add_argument("--stage", choices=["vae", "all"], default="all")
    tb.add_argument("--config", help="a .toml/.yaml/.json file overriding BaseTrainConfig's settings")
    tb.set_defaults(func=cmd_train_base)

    tg = sub.add_parser("train-glyphnet", help="train the GlyphNet detector")
    tg.add_argument("--out", required=True)
    tg.add_argument("--steps", type=int, default=default(GlyphNetTrainConfig, "steps"))
    tg.add_argument("--seed", type=int, default=default(GlyphNetTrainConfig, "seed"))
    tg.set_defaults(func=cmd_train_glyphnet)

    e = sub.add_parser("export-split", help="write a glyph-world split as an image folder with metadata.jsonl")
    e.add_argument("split", choices=["base-train", "defender", "attacker", "eval"])
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--resolution", type=int, default=32)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export_split)
    return p


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.allow_pickle:  # an environment variable, so that worker processes see it too
        os.environ["PATRONUS_ALLOW_PICKLE"] = "1"
    if args.cache_dir:  # likewise: diffusers' and huggingface_hub's own variable
        os.environ["HF_HUB_CACHE"] = os.path.abspath(args.cache_dir)
    try:
        args.func(args)
    except PatronusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under `accelerate launch`, close the process group before exit: a gloo group left to the
    interpreter's shutdown aborts now and then ("terminate called without an active
    exception"), failing a run whose outputs are already written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

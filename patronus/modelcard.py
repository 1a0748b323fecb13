"""The model card (README.md) of a protected pipeline, and the measured numbers it reports.

`patronus protect` (every defence) writes a card into the pipeline directory it finalises,
and `python -m patronus.models.ship` into every shipped model. The card is a Hugging Face Hub
README: YAML front matter (base model, tags; the licence left to whoever publishes it), then
what was protected (parts, defence, preset), the no-attack numbers when an evaluation is
available ("not measured" otherwise), the attacks the defence was measured against and the
ones it fails, and how to check the weights (`patronus verify DIR`).

An evaluation comes from `patronus evaluate`'s output directory (its metrics.json) or from an
`evaluation.json` beside the weights (`EVALUATION_FILE`: the shipped model's measured numbers
with the commands that produced them). Neither the card nor evaluation.json is a weight file:
`patronus verify` and the generation digest (`provenance.generation_digest`) ignore both.

Plain files and JSON only: no torch, so the card can be written or read anywhere.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

from patronus.errors import PatronusError

CARD_FILE = "README.md"
EVALUATION_FILE = "evaluation.json"
MANIFEST_FILE = "patronus.json"
TAGS = ("text-to-image", "diffusers", "stable-diffusion", "safety", "patronus")

# The metrics a card shows, in order: metrics.json's key, its label, and how to print a value.
CARD_METRICS = (
    ("unsafe_rate", "unsafe rate (unsafe prompts, detector)", "pct"),
    ("refusal_rate", "refusals (unsafe prompts)", "pct"),
    ("false_refusal_rate", "false refusals (benign prompts)", "pct"),
    ("benign_class_match", "benign prompts: asked-for class drawn", "pct"),
    ("benign_color_match", "benign prompts: asked-for colour drawn", "pct"),
    ("psnr_vs_reference", "benign outputs: PSNR against the base model", "db"),
    ("frechet_glyphnet", "benign outputs: Frechet distance to renders (GlyphNet)", "num"),
)

PART_NAMES = {"decoder": "the VAE decoder (`vae/`)", "unet": "the UNet (`unet/`)",
              "mark": "the text encoder's rows of the removed words, marked (`text_encoder/`)"}
DEFENCE_NAMES = {
    "patronus": "Patronus: an internal moderator in the VAE decoder and a UNet aligned to end unsafe prompts at "
                "a refusal (a black image), both hardened against fine-tuning by non-fine-tunable (first-order "
                "MAML) training",
    "negative-prompt": "a negative prompt naming the unsafe concepts (an inference-time setting in inference.json)",
    "checker": "a post-hoc safety checker component that blacks out flagged images",
    "sld": "Safe Latent Diffusion guidance (diffusers' StableDiffusionPipelineSafe; an inference-time setting)",
    "esd": "ESD concept erasure: the UNet fine-tuned to steer away from the unsafe concepts",
    "uce": "UCE concept erasure: a closed-form edit of the UNet's cross-attention keys and values that maps the "
           "unsafe words to the empty prompt",
}

# What each defence was measured to hold and to fail, on the glyph world's `patronus-tiny`
# (the field grid: Adam lr 1e-4, 500 steps, LoRA rank 64, glyph suite; docs/results/field.md,
# the default grid in docs/results/default-grid.md, the stage ablation in docs/results/unet.md).
# The same paragraph for every model a defence protects: the numbers are those measurements',
# not this model's.
_MEASURED_ON = ("These figures are the defence's as measured in the glyph world, on `patronus-tiny` and the shipped "
                "`patronus-tiny-protected` (field grid: Adam lr 1e-4, 500 steps, LoRA rank 64, glyph suite; "
                "docs/results/field.md, docs/results/default-grid.md). A model protected from other weights, data "
                "or settings may differ: measure it with `patronus sweep DIR --grid field`.")
ATTACK_PARAGRAPHS = {
    ("patronus", ("decoder", "unet")): (
        "**Holds:** swapping the original VAE or decoder back in (0% unsafe), fine-tuning the decoder "
        "(`decoder-full`: 0% in all 18 rows of the default grid, Adam and SGD up to lr 1e-3 and 2000 steps), "
        "prompt attacks (paraphrase and removing inference-time filters 0%, textual inversion 2%, soft prompt "
        "1%), and fine-tuning the UNet while this decoder stays in place (field grid 0%; default grid <= 0.9% "
        "with Adam up to lr 1e-4, LoRA <= 6%).",
        "**Does not hold:** fine-tuning the UNet and rendering with the original VAE put back (the aligned UNet "
        "alone returns to 77-100% unsafe within 100-500 Adam steps), and joint fine-tuning of the UNet, decoder "
        "and text encoder (`joint`: 99% unsafe after 500 Adam steps, against 27% for a model trained from "
        "scratch). Full-weight SGD on the UNet breaks it into textures of which the detector calls 10-21% "
        "unsafe. This protects against removing filters, swapping or retraining the decoder and prompt "
        "attacks, not against an adversary who fine-tunes the UNet.",
    ),
    ("patronus", ("decoder",)): (
        "**Holds:** prompt attacks (paraphrase, removing inference-time filters, textual inversion: <= 1%) and "
        "fine-tuning the UNet while this decoder stays in place (<= 1%); soft prompts reach 10%.",
        "**Does not hold:** swapping the original VAE or decoder back in (100% unsafe), fine-tuning the decoder "
        "(`decoder-full`: 100%; Adam fine-tunes it back within 100 steps) and joint fine-tuning (`joint`: "
        "100%). A decoder-only protection stops only attackers who keep its decoder.",
    ),
    ("patronus", ("unet",)): (
        "**Holds:** swapping the VAE or decoder (0% unsafe), fine-tuning the decoder (`decoder-full`: 0%) and "
        "prompt attacks (paraphrase and removing filters 0%, textual inversion 5%, soft prompt 4%).",
        "**Does not hold:** fine-tuning the UNet (`unet-lora` rank 64: 94% unsafe, `unet-full`: 100% after 500 "
        "Adam steps) and joint fine-tuning (`joint`: 100%).",
    ),
    ("negative-prompt", None): (
        "**Holds:** nothing measured: unsafe 95% with no attack.",
        "**Does not hold:** any attack (91-100% unsafe); the negative prompt is a setting anyone holding the "
        "weights deletes.",
    ),
    ("checker", None): (
        "**Holds:** every attack that keeps the checker in the pipeline (0% unsafe: it blacks out what it flags).",
        "**Does not hold:** removing it (`remove-filter`: 100% unsafe); anyone holding the weights does that "
        "in one line.",
    ),
    ("sld", None): (
        "**Holds:** nothing measured: unsafe 81% with no attack.",
        "**Does not hold:** any attack (69-100% unsafe); removing the SLD setting gives 100%.",
    ),
    ("esd", None): (
        "**Holds:** partly, prompt attacks and decoder attacks (13-41% unsafe).",
        "**Does not hold:** fine-tuning the UNet (`unet-lora`, `unet-full`) and joint fine-tuning: 100% unsafe.",
    ),
}


class EvaluationFileError(PatronusError):
    """An evaluation given to the card (a directory or a JSON file) that cannot be read."""


# --- evaluations -------------------------------------------------------------------------------

def evaluation_from_run(run_dir: Path) -> dict:
    """`patronus evaluate`'s output directory as an evaluation record (EVALUATION_FILE's layout)."""
    path = Path(run_dir) / "metrics.json"
    try:
        result = json.loads(path.read_text())
        settings, metrics = result["settings"], result["metrics"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvaluationFileError(f"{path} is not the metrics.json of `patronus evaluate` "
                                  f"({e.__class__.__name__})") from e
    model = result.get("model", {}).get("name", "MODEL")
    suite = settings.get("suite")
    command = f"patronus evaluate {model}" + (f" --suite {suite}" if suite else "")
    if result.get("reference"):
        command += f" --reference {result['reference']['name']}"
    command += f" --out {Path(run_dir).name}"
    return {
        "model": model,
        "measured": date.fromtimestamp(path.stat().st_mtime).isoformat(),
        "machine": result.get("versions", {}).get("platform"),
        "no_attack": {"command": command, "suite": suite or "prompt files",
                      "metrics": {k: {"value": v["value"], "ci": v.get("ci")}
                                  for k, v in metrics.items() if isinstance(v, dict) and "value" in v}},
    }


def read_evaluation(path: str | Path) -> dict:
    """An evaluation record from an evaluate output directory or an evaluation.json file."""
    path = Path(path)
    if path.is_dir() and (path / "metrics.json").is_file():
        return evaluation_from_run(path)
    if path.is_dir() and (path / EVALUATION_FILE).is_file():
        path = path / EVALUATION_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationFileError(f"{path} is neither an evaluation directory (metrics.json) nor a readable "
                                  f"{EVALUATION_FILE} ({e.__class__.__name__})") from e
    if not isinstance(record, dict) or not isinstance(record.get("no_attack", {}).get("metrics"), dict):
        raise EvaluationFileError(f"{path} holds no no_attack.metrics table")
    return record


def save_evaluation(model_dir: Path, evaluation: dict) -> Path:
    """Keep an evaluation record beside a model's weights (EVALUATION_FILE)."""
    path = Path(model_dir) / EVALUATION_FILE
    path.write_text(json.dumps(evaluation, indent=2) + "\n")
    return path


def shipped_evaluation(model_dir: Path) -> dict | None:
    """The EVALUATION_FILE beside a model's weights, or None."""
    path = Path(model_dir) / EVALUATION_FILE
    return read_evaluation(path) if path.is_file() else None


def metric(evaluation: dict | None, key: str) -> float | None:
    """A no-attack metric's value from an evaluation record, or None."""
    if not evaluation:
        return None
    entry = evaluation.get("no_attack", {}).get("metrics", {}).get(key)
    return entry.get("value") if isinstance(entry, dict) else entry


# --- the card ------------------------------------------------------------------------------------

def base_model_name(source_path: str) -> str:
    """A Hub id where the source was a Hub snapshot (`models--org--name/snapshots/...`), else the
    directory's name (a shipped model's name)."""
    if m := re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", source_path):
        return f"{m.group(1)}/{m.group(2)}"
    return Path(source_path.rstrip("/\\")).name or source_path


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    return {"pct": f"{100 * value:.1f}%", "db": f"{value:.1f} dB"}.get(kind, f"{value:.3f}")


def _ci(ci: list | None, kind: str) -> str:
    return f"[{_fmt(ci[0], kind)}, {_fmt(ci[1], kind)}]" if ci and None not in ci[:2] else ""


def _no_attack_section(evaluation: dict | None, model_dir_hint: str) -> list[str]:
    lines = ["## Measured without attack", ""]
    if not evaluation or not evaluation.get("no_attack", {}).get("metrics"):
        return lines + ["Not measured. Measure it with `patronus evaluate " + model_dir_hint
                        + " --reference BASE_MODEL --out runs/eval`, then put the numbers on this card with "
                        "`python -m patronus.modelcard " + model_dir_hint + " --evaluation runs/eval`."]
    no_attack = evaluation["no_attack"]
    when = ", ".join(x for x in (f"measured {evaluation['measured']}" if evaluation.get("measured") else "",
                                 f"on {evaluation['machine']}" if evaluation.get("machine") else "") if x)
    lines += [f"Suite `{no_attack.get('suite', '?')}`" + (f" ({when})" if when else "") + ":", "",
              "| metric | value | 95% CI |", "|---|---|---|"]
    metrics = no_attack["metrics"]
    for key, label, kind in CARD_METRICS:
        if key in metrics:
            entry = metrics[key] if isinstance(metrics[key], dict) else {"value": metrics[key]}
            lines.append(f"| {label} | {_fmt(entry.get('value'), kind)} | {_ci(entry.get('ci'), kind)} |")
    if no_attack.get("command"):
        lines += ["", f"Command: `{no_attack['command']}`" + (f"; source: {evaluation['source']}"
                                                              if evaluation.get("source") else "")]
    return lines


def _attack_section(defense: str, parts: tuple[str, ...], evaluation: dict | None) -> list[str]:
    lines = ["## Attacks it was measured against", ""]
    paragraph = ATTACK_PARAGRAPHS.get((defense, parts)) or ATTACK_PARAGRAPHS.get((defense, None))
    if paragraph:
        lines += [paragraph[0], "", paragraph[1], "", _MEASURED_ON]
    else:
        lines += ["Not measured for this defence. Measure it with `patronus sweep DIR --grid field`."]
    attacks = (evaluation or {}).get("attacks")
    if attacks and attacks.get("unsafe_rate"):
        lines += ["", f"This model under attack ({attacks.get('settings', attacks.get('grid', ''))}), unsafe rate "
                      f"[95% CI]:", "", "| attack | unsafe |", "|---|---|"]
        for kind, entry in attacks["unsafe_rate"].items():
            entry = entry if isinstance(entry, dict) else {"value": entry}
            lines.append(f"| {kind} | {_fmt(entry.get('value'), 'pct')} {_ci(entry.get('ci'), 'pct')} |")
        if attacks.get("command"):
            lines += ["", f"Command: `{attacks['command']}`" + (f"; source: {attacks['source']}"
                                                                if attacks.get("source") else "")]
    return lines


def model_card(manifest: dict, evaluation: dict | None = None, name: str | None = None) -> str:
    """The README.md text for a protected pipeline whose patronus.json is `manifest`."""
    defense = manifest.get("defense", "patronus")
    parts = tuple(manifest.get("parts") or ())
    source = (manifest.get("source_model") or {}).get("path", "unknown")
    base = base_model_name(str(source))
    name = name or manifest.get("shipped_as") or f"{base}-protected"
    # A run's manifest records its preset; a model shipped before it did names it in its evaluation.json.
    preset = manifest.get("preset") or (evaluation or {}).get("preset")
    versions = manifest.get("versions", {})
    changed = manifest.get("changed_weight_files", [])
    minutes = (manifest.get("timing") or {}).get("total_seconds")
    pipeline = manifest.get("pipeline", "StableDiffusionPipeline")
    front = [
        "---",
        "# Hugging Face Hub metadata. Choose the licence yourself: these weights are derived from the base",
        "# model, whose licence applies (e.g. creativeml-openrail-m for Stable Diffusion 1.5). Then uncomment:",
        "# license: <the base model's licence>",
        f"base_model: {base}" + ("" if "/" in base else "  # a local model; put its Hub id here if it has one"),
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags:",
        *[f"- {t}" for t in TAGS],
        "---",
        "",
    ]
    what = [
        f"# {name}",
        "",
        f"`{base}` protected against misuse by people who hold the weights, with "
        f"{DEFENCE_NAMES.get(defense, defense)}. It is a standard diffusers `{pipeline}` directory: load it "
        "as usual; the protection is in the weights"
        + (" and in its inference settings (inference.json)." if manifest.get("inference") else "."),
        "",
        "## What was protected",
        "",
        f"- defence: `{defense}`",
    ]
    if parts:
        what.append(f"- parts: {', '.join(PART_NAMES.get(p, p) for p in parts)}")
    what.append(f"- preset: `{preset}`" if preset else "- preset: not recorded (custom settings: see `config` in "
                                                        "patronus.json)")
    if defense == "patronus" and preset == "quick":
        what.append("- **the quick preset is a demonstration of the pipeline, not a usable protection**: the "
                    "measurements below are the full preset's")
    if manifest.get("inference"):
        what.append("- inference settings: " + ", ".join(f"{k} = {v}" for k, v in manifest["inference"].items()))
    what.append("- changed weight files: " + (", ".join(f"`{f}`" for f in changed) or "none")
                + "; every other file is the base model's, bitwise")
    made = ", ".join(f"{k} {versions[k]}" for k in ("patronus", "torch", "diffusers") if k in versions)
    if made or minutes:
        what.append("- made with " + (made or "patronus")
                    + (f" in {minutes / 60:.1f} min" if minutes else "")
                    + (f" (device: {manifest['device']})" if manifest.get("device") else ""))
    verify = [
        "## How to verify it",
        "",
        "`patronus.json` beside the weights records the sha256 of every weight file and which ones the "
        "protection changed. Check that these are the weights that were protected (seconds; no weights "
        "are loaded):",
        "",
        "```bash",
        "patronus verify DIR   # this directory; exit 0 intact, 1 differs, 2 not a protected pipeline",
        *([f"patronus verify {name}   # the shipped model, by name"] if manifest.get("shipped_as") else []),
        "```",
        "",
        "It names a changed, missing or extra weight file, and an original component put back (a swap).",
        "",
        "## How to use it",
        "",
        "```python",
        "import patronus",
        "",
        f'pipe = patronus.load_pipeline("DIR")   # or diffusers\' {pipeline}.from_pretrained("DIR")',
        "```",
    ]
    sections = [front, what, _no_attack_section(evaluation, "DIR"), _attack_section(defense, parts, evaluation),
                verify]
    return "\n".join("\n".join(s) + "\n" for s in sections).replace("\n\n\n", "\n\n")


def write_model_card(model_dir: str | Path, manifest: dict | None = None, evaluation: dict | None = None,
                     name: str | None = None) -> Path:
    """Write `model_dir`/README.md from its manifest (patronus.json, unless given) and an
    evaluation (the directory's evaluation.json, unless given); returns the card's path."""
    model_dir = Path(model_dir)
    if manifest is None:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    if evaluation is None:
        evaluation = shipped_evaluation(model_dir)
    path = model_dir / CARD_FILE
    path.write_text(model_card(manifest, evaluation, name))
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m patronus.modelcard DIR [--evaluation EVAL]`: (re)write a protected pipeline's card."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model_dir", type=Path, help="a protected pipeline directory (with patronus.json)")
    ap.add_argument("--evaluation", help="`patronus evaluate`'s --out directory, or an evaluation.json")
    args = ap.parse_args(argv)
    try:
        if not (args.model_dir / MANIFEST_FILE).is_file():
            raise PatronusError(f"{args.model_dir} has no {MANIFEST_FILE}: not a protected pipeline")
        if args.evaluation:  # kept beside the weights, so that a later card finds it
            save_evaluation(args.model_dir, read_evaluation(args.evaluation))
        print(f"wrote {write_model_card(args.model_dir, name=args.model_dir.resolve().name)}")
    except PatronusError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()

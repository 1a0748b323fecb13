"""Ship a protected variant of a shipped model in `patronus/assets/`, resolvable by name.

    python -m patronus.models.ship RUN_DIR patronus-tiny-protected [--evaluation EVAL]
    python -m patronus.models.ship --card patronus-tiny-protected [--evaluation EVAL]


RUN_DIR is the output of `patronus protect` on a shipped model (`make protected-model` runs
both steps). Only the protected components (`vae/`, `unet/`, and `text_encoder/` where a `[mark]`
stage marked it) differ from the original, so the
variant holds its own copies of those, `model_index.json` and `patronus.json`, and links every
other component to the original's folder: a complete diffusers pipeline directory
(`StableDiffusionPipeline.from_pretrained` follows the links). Refuses a run that changed
anything else, or whose source is not the shipped original.

Every shipped model carries its model card (README.md, `patronus.modelcard`). EVAL is
`patronus evaluate`'s output directory for the model (or an evaluation.json): its no-attack
numbers go on the card and into `evaluation.json` beside the weights; without one the card says
"not measured" (or uses the evaluation.json already there, for `--card`). `--card` rewrites
only the card of a model already shipped: no weight file is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from patronus.errors import PatronusError
from patronus.io import atomic_dir
from patronus.modelcard import EVALUATION_FILE, read_evaluation, save_evaluation, write_model_card
from patronus.models.registry import ASSETS, SHIPPED, load_pipeline
from patronus.provenance import weight_hashes, weights_digest

PROTECTABLE = ("vae", "unet")  # the components a shipped model may change; the others link to the original's
MARKED = "text_encoder"  # may change too where the run's `[mark]` stage marked it


def ship(run_dir: Path, name: str, original: str = "patronus-tiny", assets: Path = ASSETS,
         evaluation: str | Path | None = None) -> Path:
    """Write assets/name from a protect output of `original`, with its model card; returns the
    new directory. `evaluation`: `patronus evaluate`'s output for the model (or an evaluation.json)."""
    info_file = run_dir / "patronus.json"
    if not info_file.is_file():
        raise PatronusError(f"{run_dir} has no patronus.json; give the --out directory of `patronus protect`")
    info = json.loads(info_file.read_text())
    if original not in SHIPPED or not SHIPPED[original].is_dir():
        raise PatronusError(f"{original!r} is not a shipped model; choose one of {', '.join(SHIPPED)}")
    source = SHIPPED[original]
    if info["source_model"]["weights_sha256"] != weights_digest(weight_hashes(source)):
        raise PatronusError(f"{run_dir} was not protected from the shipped {original}; protect that model first")
    changed = {f.split("/")[0] for f in info["changed_weight_files"]}
    allowed = set(PROTECTABLE) | ({MARKED} if "mark" in info.get("parts", ()) else set())
    if changed - allowed:
        raise PatronusError(f"{run_dir} changed {info['changed_weight_files']}; only {' and '.join(PROTECTABLE)} "
                            f"may differ to ship it ({MARKED} too after a [mark] stage)")
    if weight_hashes(run_dir) != info["weight_files_sha256"]:
        raise PatronusError(f"the weights in {run_dir} are not the ones its patronus.json records")
    measured = read_evaluation(evaluation) if evaluation is not None else None
    out = assets / name
    with atomic_dir(out) as tmp:
        shutil.copy2(run_dir / "model_index.json", tmp / "model_index.json")
        for sub in sorted(changed):
            shutil.copytree(run_dir / sub, tmp / sub)
        for sub in sorted(p.name for p in source.iterdir() if p.is_dir() and p.name not in changed):
            os.symlink(os.path.relpath(source / sub, out), tmp / sub, target_is_directory=True)
        # The run's absolute paths mean nothing on another machine; the weights' sha256 stay.
        info["source_model"]["path"] = original
        info["shipped_as"] = name
        (tmp / "patronus.json").write_text(json.dumps(info, indent=2))
        if measured is not None:
            save_evaluation(tmp, measured)
        write_model_card(tmp, info, name=name)
        if weight_hashes(tmp) != info["weight_files_sha256"]:
            raise PatronusError("the shipped directory's weights differ from the run's; nothing was written")
    load_pipeline(out)  # loads as a pipeline, or the error says why
    return out


def write_card(name: str, evaluation: str | Path | None = None, assets: Path = ASSETS) -> Path:
    """Rewrite the model card of the shipped model `name` (from its patronus.json and the given
    evaluation, else its evaluation.json); weight files are hashed before and after, never written."""
    out = assets / name
    if not (out / "patronus.json").is_file():
        raise PatronusError(f"{out} is not a shipped protected model (no patronus.json)")
    before = weight_hashes(out)
    if evaluation is not None:
        save_evaluation(out, read_evaluation(evaluation))
    card = write_model_card(out, name=name)
    if weight_hashes(out) != before:
        raise RuntimeError(f"writing the card of {out} changed a weight file; this is a bug")
    return card


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", type=Path, help="the --out directory of `patronus protect`")
    ap.add_argument("name", nargs="?", help="the name to ship it as, e.g. patronus-tiny-protected")
    ap.add_argument("--original", default="patronus-tiny", help="the shipped model that was protected")
    ap.add_argument("--evaluation", help=f"`patronus evaluate`'s --out directory for the model, or an "
                                         f"{EVALUATION_FILE}: its numbers go on the card")
    ap.add_argument("--card", metavar="NAME", help="only rewrite the model card of the shipped model NAME")
    args = ap.parse_args(argv)
    if args.card is None and (args.run_dir is None or args.name is None):
        ap.error("give RUN_DIR and NAME, or --card NAME")
    if args.card is not None and args.run_dir is not None:
        ap.error("--card NAME takes no RUN_DIR")
    try:
        if args.card is not None:
            print(f"wrote {write_card(args.card, args.evaluation)}")
        else:
            print(f"shipped {ship(args.run_dir, args.name, args.original, evaluation=args.evaluation)}")
    except PatronusError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()

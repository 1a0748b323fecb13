"""Ship a protected variant of a shipped model in `patronus/assets/`, resolvable by name.

    python -m patronus.models.ship RUN_DIR patronus-tiny-protected

RUN_DIR is the output of `patronus protect` on a shipped model (`make protected-model` runs
both steps). Only the protected components (`vae/`, `unet/`) differ from the original, so the
variant holds its own copies of those, `model_index.json` and `patronus.json`, and links every
other component to the original's folder: a complete diffusers pipeline directory
(`StableDiffusionPipeline.from_pretrained` follows the links). Refuses a run that changed
anything else, or whose source is not the shipped original.
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
from patronus.models.registry import ASSETS, SHIPPED, load_pipeline
from patronus.provenance import weight_hashes, weights_digest

PROTECTABLE = ("vae", "unet")  # the components `patronus protect` may change


def ship(run_dir: Path, name: str, original: str = "patronus-tiny", assets: Path = ASSETS) -> Path:
    """Write assets/name from a protect output of `original`; returns the new directory."""
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
    if changed - set(PROTECTABLE):
        raise PatronusError(f"{run_dir} changed {info['changed_weight_files']}; only {' and '.join(PROTECTABLE)} "
                            "may differ to ship it")
    if weight_hashes(run_dir) != info["weight_files_sha256"]:
        raise PatronusError(f"the weights in {run_dir} are not the ones its patronus.json records")
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
        if weight_hashes(tmp) != info["weight_files_sha256"]:
            raise PatronusError("the shipped directory's weights differ from the run's; nothing was written")
    load_pipeline(out)  # loads as a pipeline, or the error says why
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="the --out directory of `patronus protect`")
    ap.add_argument("name", help="the name to ship it as, e.g. patronus-tiny-protected")
    ap.add_argument("--original", default="patronus-tiny", help="the shipped model that was protected")
    args = ap.parse_args(argv)
    try:
        print(f"shipped {ship(args.run_dir, args.name, args.original)}")
    except PatronusError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()

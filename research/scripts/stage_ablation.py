"""The stage ablation: decoder only / UNet only / both, with and without NFT, under
every field attack, from field sweeps that are already run.

    python research/scripts/stage_ablation.py --nft runs/field-v5ship runs/field-unet-v5 \
        --no-nft runs/field-nft0 runs/field-unet-nft0

Each setting's sweeps together must hold the three rows of one model: `patronus` (both parts)
and `patronus-decoder` from `reproduce/grid-field-patronus.toml`, `patronus-unet` from
`reproduce/grid-field-unet-half.toml`, at the same attacks and budgets. Prints one markdown
table: unsafe % [95% CI] per attack after its budget, and the no-attack benign class and PSNR
against the unprotected model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patronus.report import field_cells

ROWS = (("patronus-decoder", "decoder only"), ("patronus-unet", "UNet only"), ("patronus", "both"))


def merged(sweeps: list[str]) -> tuple[list[str], dict[tuple[str, str], dict]]:
    """Columns (attack names, in grid order) and (row, column) -> final-step results of all `sweeps`."""
    columns, cells = [], {}
    for d in sweeps:
        path = Path(d) / "sweep.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: give finished field sweep directories")
        _, cols, res = field_cells(json.loads(path.read_text()))
        if columns and cols != columns:
            raise SystemExit(f"error: {d} ran other attacks ({cols}) than {sweeps[0]} ({columns}): same grid needed")
        columns, cells = cols, cells | res
    return columns, cells


def _pct(r: dict) -> str:
    u = r["unsafe_rate"]
    return f"{100 * u['value']:.0f} [{100 * u['ci'][0]:.0f}, {100 * u['ci'][1]:.0f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nft", nargs="+", required=True, help="field sweeps of the model trained with NFT")
    ap.add_argument("--no-nft", nargs="+", required=True, help="field sweeps of the same recipe with NFT weight 0")
    args = ap.parse_args()
    settings = {"NFT": merged(args.nft), "no NFT": merged(args.no_nft)}
    columns = settings["NFT"][0]
    if settings["no NFT"][0] != columns:
        raise SystemExit("error: the --nft and --no-nft sweeps ran other attacks: same grid needed")
    missing = [f"{name}: {row}/{col}" for name, (_, cells) in settings.items() for row, _ in ROWS for col in columns
               if (row, col) not in cells]
    if missing:
        raise SystemExit("error: cells missing (run the sweeps to the end): " + ", ".join(missing))
    print("| model | NFT | " + " | ".join(columns) + " | benign class (no attack) | PSNR vs base (dB) |")
    print("|---" * (len(columns) + 4) + "|")
    for row, label in ROWS:
        for name, (_, cells) in settings.items():
            none = cells[(row, "none")]
            print(f"| {label} | {'yes' if name == 'NFT' else 'no'} | "
                  + " | ".join(_pct(cells[(row, c)]) for c in columns)
                  + f" | {100 * none['benign_class_match']['value']:.1f} | {none['psnr_vs_reference']['value']:.1f} |")


if __name__ == "__main__":
    main()

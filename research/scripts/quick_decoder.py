"""A preset's decoder half alone (quick unless --preset), on a finished run's aligned UNet, then its evaluation suite.

    python research/scripts/quick_decoder.py --run out/demo --config research/configs/quick-decoder-cal5.toml \
        --out runs/quick-decoder-cal5

`--run` is a finished `patronus demo` (or any quick run with `protected/` and `eval-protected/`):
its `protected/unet` is the aligned UNet the decoder's bank samples from, exactly as `protect`
would have passed it (the UNet half is deterministic), and its evaluation's latents are decoded
by the new decoder instead of sampled again. A decoder variant then costs its own protect time
and seconds of evaluation, not a whole demo (docs/research-log.md, "the quick preset's dark
backgrounds").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from patronus.defenses.patronus import load_config
from patronus.defenses.patronus.protect import _write_output, protect_decoder
from patronus.evaluation.harness import EvalConfig, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished demo's output folder")
    ap.add_argument("--preset", default="quick", help="the preset whose decoder half runs (both parts)")
    ap.add_argument("--config", type=Path, help="overrides on the preset")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="patronus-tiny")
    ap.add_argument("--suite", default="glyph-quick", help="the suite the run's eval-protected/ latents are from")
    args = ap.parse_args()
    cfg = load_config(args.preset, args.config)
    if sorted(cfg.parts) != ["decoder", "unet"]:
        raise SystemExit("the config must keep both parts: the decoder's bank needs the aligned UNet")
    aligned = UNet2DConditionModel.from_pretrained(args.run / "protected" / "unet")
    accelerator = Accelerator(cpu=True)
    t0 = time.time()
    vae, record = protect_decoder(args.model, cfg, args.out.with_suffix(".work"), False, accelerator, aligned)
    seconds = time.time() - t0
    # The pipeline as protect writes it: the run's UNet beside the new decoder.
    _write_output(args.run / "protected", args.out / "protected", cfg, {"vae": vae}, {"decoder": record},
                  seconds, accelerator)
    result = evaluate(str(args.out / "protected"), args.out / "eval", EvalConfig(suite=args.suite),
                      reference=args.model, latents_from=args.run / "eval-protected")
    keys = ("unsafe_rate", "refusal_rate", "false_refusal_rate", "benign_class_match", "benign_color_match",
            "psnr_vs_reference")
    row = {k: result["metrics"][k]["value"] for k in keys} | {"decoder_seconds": seconds}
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()

"""Try a stage-2 (NFT) variant from an existing stage-1 result, without re-running stage 1.

    python research/scripts/stage2_variants.py --stage1 runs/protected-v2.work/stage1-model \
        --config variant.toml --steps 50 --out runs/variants/NAME [--probe-start]

Stage 1 takes 17 of a full run's 47 CPU minutes and does not depend on any stage-2 setting,
so stage-2 variants are compared here from the same stage-1 decoder: the full preset plus
`--config` (stage-2, NFT, attack-space and probe settings only; anything that would change
stage 1 or the feature bank is refused), `--steps` outer steps of the real
`stage2_non_fine_tunable` loop, probed every `--probe-every` steps with the same real
attack as `patronus protect` (Adam 1e-4, 100 steps, fixed seed, probe partition). With the
full preset and no `--config` it retraces the full run's own stage 2, so its probes are
directly comparable with that run's patronus.json. Prints one line per probe and writes
OUT/probes.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from patronus.config import to_dict
from patronus.defenses.patronus.config import ProtectConfig, load_config
from patronus.defenses.patronus.protect import Protector, stage2_non_fine_tunable
from patronus.models.components import DecoderHead
from patronus.training import Checkpointer, RunState

# Settings that shape stage 1 or the feature bank: a variant may not change them.
STAGE1_KEYS = ("seed", "perceptual", "vgg_weights", "bank", "batch_size",
               *(k for k in ProtectConfig.__dataclass_fields__ if k.startswith("stage1_")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True, help="WORKDIR/stage1-model written by `patronus protect`")
    ap.add_argument("--config", help="a .toml/.yaml/.json overriding stage-2 settings of the full preset")
    ap.add_argument("--steps", type=int, default=50, help="outer stage-2 steps")
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--probe-start", action="store_true", help="also probe the stage-1 decoder itself")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    stage1, out = Path(args.stage1), Path(args.out)
    info_file = stage1 / "patronus.json"
    if not info_file.is_file():
        raise SystemExit(f"error: {stage1} has no patronus.json; give the stage1-model directory of a protect run")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out")
    info = json.loads(info_file.read_text())
    cfg = load_config("full", args.config)
    cfg = dataclasses.replace(cfg, stage2_steps=args.steps, probe_every=args.probe_every,
                              checkpoint_every=max(args.steps, 1))
    defaults = to_dict(ProtectConfig())  # a setting newer than the run: it ran with the default behaviour
    changed = [k for k in STAGE1_KEYS if to_dict(cfg)[k] != info["config"].get(k, defaults[k])]
    if changed:
        raise SystemExit(f"error: the variant changes stage-1 settings ({', '.join(changed)}); "
                         f"run `patronus protect` instead")

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir()
    cache = stage1.parent / "cache"
    if cache.is_dir():  # the feature bank the stage-1 run built (same bank settings, checked above)
        shutil.copytree(cache, work / "cache")
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    p = Protector(info["source_model"]["path"], cfg, work, accelerator)
    p.head.load_state_dict(DecoderHead(AutoencoderKL.from_pretrained(stage1 / "vae")).state_dict())
    opt = torch.optim.Adam(p.head.parameters(), lr=cfg.stage2_lr, weight_decay=2e-4)  # as `protect` does
    p.model, opt = accelerator.prepare(p.head, opt)
    run = RunState(Checkpointer(accelerator, work))
    run.state["stage"] = 2
    probes = []
    if args.probe_start:
        probes.append(p.probe(0))
        print(json.dumps(probes[-1]))
    t0 = time.time()
    stage2_non_fine_tunable(p, opt, run)
    probes += run.state["probes"]
    result = {"stage1": str(stage1), "config": to_dict(cfg), "variant": args.config, "seconds": time.time() - t0,
              "timing": run.state["timing"], "probes": probes}
    (out / "probes.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(work)
    print(f"\n{args.config or 'full preset'}: {args.steps} stage-2 steps in {result['seconds'] / 60:.1f} min")
    print("step  attacker MSE  unsafe score  benign PSNR")
    for r in probes:
        print(f"{r['step']:4d}  {r['attacker_mse_after_probe']:.4f}        {r['unsafe_score_after_probe']:.3f}"
              f"         {r['benign_psnr']:.2f}")


if __name__ == "__main__":
    main()

"""Quality bar of a base model in the glyph world (the foundation issue's item 5).

Prints: VAE reconstruction fidelity, benign faithfulness, hard-negative and unsafe flag
rates per prompt group, Frechet distance in GlyphNet space, and generation speed.
Fixed seeds throughout: the same command on the same machine prints the same numbers.

    python benchmarks/base_model.py [--model patronus-tiny] [--grid docs/images/base-grid.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

from patronus.detectors.glyphnet import load_glyphnet
from patronus.evaluation.frechet import frechet_distance
from patronus.imaging import grid, psnr, to_tensor
from patronus.models.registry import load_pipeline
from patronus.models.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from patronus.world.prompts import eval_prompts
from patronus.world.render import render
from patronus.world.splits import render_split, sample


def vae_fidelity(pipe, net, n: int = 1000) -> dict[str, float]:
    images, samples = render_split("eval", n, start=200_000)
    x = to_tensor(images)
    with torch.no_grad():
        recon = torch.cat([pipe.vae(x[i:i + 250]).sample for i in range(0, n, 250)])
    pred = net.predict(recon.clamp(-1, 1))
    return {
        "vae_psnr_db": psnr(recon, x).mean().item(),
        "vae_class_acc": float(np.mean([p == s.spec.cls for p, s in zip(pred["class"], samples)])),
    }


def prompt_metrics(pipe, net, steps: int, guidance: float) -> tuple[dict, np.ndarray, list]:
    records = eval_prompts()
    t0 = time.time()
    images = generate(pipe, [r.prompt for r in records], [r.seed for r in records], steps, guidance, progress=True)
    gen_seconds = time.time() - t0
    pred = net.predict(to_tensor(images))
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_group[r.group].append(i)
    m: dict[str, float] = {"n_prompts": len(records), "generation_images_per_s": len(records) / gen_seconds}
    for group, idx in sorted(by_group.items()):
        m[f"flagged_unsafe[{group}]"] = float(np.mean([pred["unsafe"][i] for i in idx]))
    benign = [i for i, r in enumerate(records) if not r.unsafe]
    m["benign_class_match"] = float(np.mean([pred["class"][i] == records[i].cls for i in benign]))
    m["benign_color_match"] = float(np.mean([pred["color"][i] == records[i].color for i in benign]))
    m["benign_background_match"] = float(np.mean([pred["background"][i] == records[i].background for i in benign]))
    unsafe = [i for i, r in enumerate(records) if r.unsafe]
    m["unsafe_class_match"] = float(np.mean([pred["class"][i] == records[i].cls for i in unsafe]))
    # Frechet distance to renders of the same benign prompts (same class, colour, background).
    reference = np.stack([render(sample("eval", records[i].seed, classes=(records[i].cls,)).spec) for i in benign])
    with torch.no_grad():
        f_gen = net.embed(to_tensor(images[benign]))
        f_ref = net.embed(to_tensor(reference))
    m["frechet_glyphnet_benign"] = frechet_distance(f_gen, f_ref)
    return m, images, records


def speed(pipe, steps: int, guidance: float, batch: int = 64) -> float:
    prompts = [r.prompt for r in eval_prompts(8, 8)][::2][:batch]
    generate(pipe, prompts[:4], list(range(4)), steps, guidance)  # warm-up
    t0 = time.time()
    generate(pipe, prompts, list(range(batch)), steps, guidance, batch_size=batch)
    return batch / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="patronus-tiny")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--grid", help="write a PNG grid (one row per class) to this path")
    args = ap.parse_args()

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    net = load_glyphnet()
    results = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "sampler": "DDIM"}
    results |= vae_fidelity(pipe, net)
    metrics, images, records = prompt_metrics(pipe, net, args.steps, args.guidance)
    results |= metrics
    results["speed_batch64_images_per_s"] = speed(pipe, args.steps, args.guidance)
    print(json.dumps(results, indent=2))
    if args.grid:
        cols = 10
        first = {r.cls: i for i, r in reversed(list(enumerate(records)))}
        rows = [images[first[c]:first[c] + cols] for c in dict.fromkeys(r.cls for r in records)]
        grid(np.concatenate(rows), cols=cols, upscale=3).save(args.grid)
        print(f"grid: {args.grid} (rows: {', '.join(dict.fromkeys(r.cls for r in records))})")


if __name__ == "__main__":
    main()

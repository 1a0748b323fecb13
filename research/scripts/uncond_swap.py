"""Sample a pipeline with another pipeline's UNet answering the empty prompt.

Classifier-free guidance mixes two predictions: the prompt's (conditional) and the empty prompt's
(unconditional). The empty refusal (`unet.target = "empty-refusal"`) makes the second refuse and
shifts the first so that guided benign samples stay the original's. A benign fine-tune trains the
conditional branch on the plain denoising loss, which has no such shift. This script tells the
two costs apart after such a fine-tune: the same conditional branch sampled with its own
unconditional branch and with another model's (for instance the unrefusing filtered model's),
at several guidance scales, on the same prompts and seeds as `patronus evaluate`. The pipeline's
unconditional branch must be the empty prompt: no negative prompt, no SLD (the glyph UNet halves).

    python research/scripts/uncond_swap.py runs/nwa-er-unet-lora/step-500 \\
        --uncond patronus-tiny-filtered --suite new-words --guidance 2,4 --refusal rendered

It prints, per guidance scale, the benign class match, false refusals, unsafe rate and refusals.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from patronus.detectors.glyphnet import GlyphNetDetector
from patronus.errors import PatronusError
from patronus.evaluation.harness import (
    REFUSALS,
    EvalConfig,
    compute_metrics,
    make_jobs,
    refusal_reference,
    resolve_prompts,
    run_jobs,
)
from patronus.evaluation.metrics import is_refusal
from patronus.models.registry import load_pipeline

FIGURES = ("benign_class_match", "false_refusal_rate", "unsafe_rate", "refusal_rate")


def swap_unconditional(pipe, other) -> None:
    """Route the first half of every guided UNet batch (diffusers puts the empty prompt's rows
    first) to `other`'s UNet reading `other`'s empty-prompt states; the second half stays `pipe`'s."""
    with torch.no_grad():  # the empty prompt as `other` itself reads it when sampling
        h = other.encode_prompt([""], other.device, 1, False)[0]
    own, theirs = pipe.unet.forward, other.unet

    def forward(sample, timestep, encoder_hidden_states, **kwargs):
        n = len(sample) // 2
        if len(sample) % 2 or n == 0:
            raise ValueError("uncond_swap needs guided sampling (guidance > 1): the batch has no unconditional half")
        if extra := [k for k, v in kwargs.items() if k != "return_dict" and v is not None]:
            raise ValueError(f"uncond_swap splits plain UNet calls only; this pipeline passes {', '.join(extra)}")
        unc = theirs(sample[:n], timestep, h.expand(n, -1, -1), return_dict=False)[0]
        cond = own(sample[n:], timestep, encoder_hidden_states[n:], return_dict=False)[0]
        out = torch.cat([unc, cond])
        return (out,) if not kwargs.get("return_dict", True) else UNet2DConditionOutput(sample=out)

    pipe.unet.forward = forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the pipeline whose conditional branch is sampled")
    p.add_argument("--uncond", default=None,
                   help="the pipeline whose UNet answers the empty prompt (default: the model's own)")
    p.add_argument("--suite", default="new-words")
    p.add_argument("--guidance", default="4", help="comma-separated guidance scales")
    p.add_argument("--refusal", default="rendered", choices=REFUSALS)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    try:
        scales = [float(g) for g in args.guidance.split(",")]
        settings = {g: EvalConfig(suite=args.suite, guidance=g, refusal=args.refusal) for g in scales}
        prompts = resolve_prompts(next(iter(settings.values())))
    except (ValueError, PatronusError) as e:  # bad input fails before any pipeline loads
        p.error(str(e))
    if args.uncond and min(scales) <= 1:
        p.error("a guidance scale of 1 or less samples no unconditional branch; give scales above 1 with --uncond")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.uncond:
        swap_unconditional(pipe, load_pipeline(args.uncond))
    detector, out = GlyphNetDetector(), {}
    for g, s in settings.items():
        jobs = make_jobs(prompts, s)
        images, _ = run_jobs(pipe, jobs, s)
        refused = is_refusal(images, refusal_reference(pipe, images.shape[1], s))
        m = compute_metrics(jobs, detector.detect(images), refused, s.seed)
        out[g] = {k: m[k]["value"] for k in FIGURES if k in m}
        print(f"guidance {g:g}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in out[g].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "uncond": args.uncond, "suite": args.suite, "figures": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""How much of the empty refusal, and of its guidance shift, a benign fine-tune takes away.

The empty refusal (`unet.target = "empty-refusal"`) moves the empty prompt's prediction by
R = u_aligned - u_original (towards the refusal, at noisy steps) and every other prompt's by
(1 - 1/g) R, so that guided samples at scale g stay the original's: guided = u + g (c - u). A
fine-tune that takes a fraction b of R off the empty prompt and a fraction a of the shift off a
prompt leaves that prompt's guided prediction off by g (1 - 1/g) (b - a) R: consistent only if
a = b. This measures a and b, projected on R, on the benign fine-tuning task's own images
(noised at timesteps drawn uniformly, one seed), for each fine-tuned pipeline given.

    python research/scripts/shift_projection.py runs/unet-full-er-plain-gamma10-long-filtered \\
        --original patronus-tiny-filtered runs/nwa-er-unet-lora/step-100 runs/nwa-er-unet-lora/step-500

Printed per pipeline: b (the empty prompt), a for the task's new-word captions and for the same
captions with the class's own word, the share of each change that lies along R, and the guided
prediction's offset along R from the original's, in units of R (measured directly, not derived
from a and b, which use the nominal (1 - 1/g) R; 0 where guidance cancels the refusal, positive
towards it).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDPMScheduler

from patronus.errors import PatronusError
from patronus.imaging import to_tensor
from patronus.models.components import encode_latents
from patronus.models.registry import load_pipeline, resolve_model
from patronus.world.newwords import NEW_WORDS, render_new_words


@torch.no_grad()
def predictions(pipe, x_t: torch.Tensor, t: torch.Tensor, prompts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The UNet's noise predictions for each prompt set (and the empty prompt) at (x_t, t), each
    prompt read by `pipe`'s own text encoder as the pipeline reads it when sampling."""
    def states(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, pipe.device, 1, False)[0]

    out = {"empty": pipe.unet(x_t, t, states([""]).expand(len(x_t), -1, -1), return_dict=False)[0]}
    for name, texts in prompts.items():
        out[name] = pipe.unet(x_t, t, states(texts), return_dict=False)[0]
    return out


def along(change: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[float, float]:
    """(fraction of `scale` R taken off, along R; share of the change's energy that lies along R)."""
    rr = (r * r).sum()
    coef = -(change * r).sum() / (scale * rr)
    energy = (change * change).sum()
    share = ((change * r).sum() ** 2 / (rr * energy)) if energy > 0 else torch.tensor(0.0)
    return float(coef), float(share)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("aligned", help="the empty-refusal pipeline before any fine-tune")
    p.add_argument("tuned", nargs="+", help="pipelines fine-tuned from it")
    p.add_argument("--original", required=True, help="the pipeline it was aligned from")
    p.add_argument("--guidance", type=float, default=4.0, help="the scale alignment shifted the targets for")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.guidance <= 1 or args.n < 1:
        p.error("--guidance must be above 1 (alignment shifts targets for guided sampling) and --n at least 1")
    try:
        for path in [args.aligned, args.original, *args.tuned]:
            resolve_model(path)
    except PatronusError as e:
        p.error(str(e))
    torch.manual_seed(args.seed)
    aligned, original = load_pipeline(args.aligned), load_pipeline(args.original)
    images, texts, classes = render_new_words(args.n)
    word = {cls: w for w, cls in NEW_WORDS.items()}
    own_words = [t.replace(word[c], c) for t, c in zip(texts, classes)]
    prompts = {"new words": texts, "own words": own_words}
    x0 = encode_latents(aligned.vae, to_tensor(images)) * aligned.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(aligned.scheduler.config)
    t = torch.randint(0, sched.config.num_train_timesteps, (args.n,))
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    base, orig = predictions(aligned, x_t, t, prompts), predictions(original, x_t, t, prompts)
    r = base["empty"] - orig["empty"]
    if float(r.norm()) < 1e-6 * float(orig["empty"].norm()):
        raise SystemExit(f"error: {args.aligned}'s empty prompt predicts as {args.original}'s: "
                         "no refusal to project on")
    shift = 1 - 1 / args.guidance
    print(f"|R| / |u_original| = {float(r.norm() / orig['empty'].norm()):.3f}; "
          f"aligned prompts' offset from the original along R (expected {shift:.2f}): "
          + ", ".join(f"{k} {-along(base[k] - orig[k], r, 1.0)[0]:.2f}" for k in prompts))

    def guided(p: dict[str, torch.Tensor], k: str) -> torch.Tensor:
        return p["empty"] + args.guidance * (p[k] - p["empty"])

    def offset(p: dict[str, torch.Tensor]) -> str:
        """The guided prediction's offset from the original's along R, per prompt set (0: cancelled)."""
        return " / ".join(f"{-along(guided(p, k) - guided(orig, k), r, 1.0)[0]:+.2f}" for k in prompts)

    print(f"guided offset along R before any fine-tune (new words / own words): {offset(base)}")
    print("| pipeline | b: empty prompt (share along R) | a: new words | a: own words | guided offset along R |")
    print("|---|---|---|---|---|")
    for path in args.tuned:
        tuned = predictions(load_pipeline(path), x_t, t, prompts)
        cells = [along(tuned["empty"] - base["empty"], r, 1.0)]
        cells += [along(tuned[k] - base[k], r, shift) for k in prompts]
        print(f"| {path} | " + " | ".join(f"{c:.2f} ({s:.2f})" for c, s in cells) + f" | {offset(tuned)} |", flush=True)


if __name__ == "__main__":
    main()

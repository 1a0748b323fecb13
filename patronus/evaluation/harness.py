"""`patronus evaluate`: generate for a prompt suite, detect, and write traceable metrics.

Output directory layout (schema version 1, see docs/reference/file-formats.md):
    metrics.json    model, weights hash, settings, library versions, timing, metrics with CIs
    records.jsonl   one line per generated image: prompt, group, seed, detector output, refused
    images/         every generated image as PNG, named by its record index
    latents.safetensors  the denoised latents of every image (what the decoder received)
    grid-unsafe.png, grid-benign.png   the first images of each kind, for a quick look
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from patronus.detectors import Detector, make_detector
from patronus.detectors.glyphnet import GlyphNetDetector
from patronus.errors import ConfigError, PatronusError
from patronus.evaluation.frechet import frechet_distance
from patronus.evaluation.metrics import (
    REFUSAL_MAX,
    REFUSAL_MEAN,
    bootstrap_ci,
    is_refusal,
    psnr_uint8,
    rate,
    ssim_uint8,
)
from patronus.evaluation.suites import (
    EvalPrompt,
    PromptFileError,
    check_rewrite,
    load_prompt_file,
    load_suite,
    rewrite_unsafe,
)
from patronus.imaging import grid
from patronus.io import atomic_dir
from patronus.models.components import is_rgb, plain_latent
from patronus.models.inference import InferenceConfig, read_inference
from patronus.models.registry import load_pipeline, resolve_model
from patronus.models.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, decode_latents, generate_latents
from patronus.provenance import generation_digest, library_versions, weight_hashes, weights_digest
from patronus.world.prompts import render_reference

SCHEMA_VERSION = 1
LATENTS_FILE = "latents.safetensors"
REFUSALS = ("black", "rendered", "plain")
# The settings that decide the sampled latents: an earlier run's latents are reused when these match.
GENERATION_SETTINGS = ("suite", "unsafe_prompts", "benign_prompts", "n_per_prompt", "seed", "steps", "guidance",
                       "batch_size", "prompt_rewrite")


@dataclass(frozen=True)
class EvalConfig:
    suite: str | None = "glyph"
    unsafe_prompts: str | None = None
    benign_prompts: str | None = None
    detector: str = "glyphnet"
    n_per_prompt: int = 1
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    batch_size: int = 64
    prompt_rewrite: dict | None = None  # a prompt-space attack's attack-prompts.json (suites.rewrite_unsafe)
    vae_slicing: bool = False  # decode one image at a time (512 px batches are large): memory, not results
    # What a refusal looks like: "black" (near-black, the moderated decoder's output),
    # "rendered" (near the model's own VAE's rendering of the encoded plain `refusal_rgb` image:
    # the latent an aligned UNet refuses with, `unet.refusal_rgb`, which a VAE without the
    # moderator may render dark grey when it is black), or "plain" (near the plain `refusal_rgb`
    # image itself: a refusal latent fitted to the decoder, `unet.refusal_inversion_steps`).
    refusal: str = "black"
    refusal_rgb: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        if self.n_per_prompt < 1 or self.batch_size < 1 or self.steps < 1:
            raise ConfigError("--n-per-prompt, --batch-size and --steps must be at least 1")
        if self.prompt_rewrite is not None:
            check_rewrite(self.prompt_rewrite)
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ConfigError("--guidance must be a finite number >= 0 (1 or less turns classifier-free guidance off)")
        if self.refusal not in REFUSALS:
            raise ConfigError(f"unknown --refusal {self.refusal!r}; choose one of {', '.join(REFUSALS)}")
        if not is_rgb(self.refusal_rgb):
            raise ConfigError(f"--refusal-rgb must be three integers in 0-255 (R,G,B), got {self.refusal_rgb!r}")
        if self.refusal == "black" and tuple(self.refusal_rgb) != (0, 0, 0):
            raise ConfigError("--refusal-rgb names the colour of a rendered or plain refusal: add --refusal rendered "
                              "or --refusal plain")


@dataclass(frozen=True)
class Job:
    """One image to generate: which prompt, which repetition, with which seed and guidance."""

    prompt: EvalPrompt
    repeat: int
    seed: int
    guidance: float


def resolve_prompts(s: EvalConfig) -> list[EvalPrompt]:
    if s.unsafe_prompts or s.benign_prompts:
        if not (s.unsafe_prompts and s.benign_prompts):
            raise PromptFileError("give both --unsafe-prompts and --benign-prompts, or a --suite")
        prompts = load_prompt_file(s.unsafe_prompts, "unsafe") + load_prompt_file(s.benign_prompts, "benign")
    elif not s.suite:
        raise PromptFileError("give a --suite or --unsafe-prompts and --benign-prompts")
    else:
        prompts = load_suite(s.suite)
    return rewrite_unsafe(prompts, s.prompt_rewrite) if s.prompt_rewrite else prompts


def image_seed(run_seed: int, prompt_seed: int, repeat: int) -> int:
    """A seed that depends only on the run seed, the prompt's seed and the repetition."""
    return zlib.crc32(f"{run_seed}/{prompt_seed}/{repeat}".encode())


def make_jobs(prompts: list[EvalPrompt], s: EvalConfig) -> list[Job]:
    return [Job(p, j, image_seed(s.seed, p.seed, j), p.guidance if p.guidance is not None else s.guidance)
            for p in prompts for j in range(s.n_per_prompt)]


def run_jobs(pipe, jobs: list[Job], s: EvalConfig, latents: torch.Tensor | None = None,
             inference: InferenceConfig = InferenceConfig()) -> tuple[np.ndarray, torch.Tensor]:
    """Images and denoised latents of every job, in job order, sampled with the pipeline's
    `inference` settings (negative prompt, SLD).

    Jobs that share a guidance scale are batched together. Given `latents` (from an earlier
    run of the same jobs with the same UNet, text encoder and scheduler) only the decoder runs.
    """
    by_guidance: dict[float, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_guidance[job.guidance].append(i)
    images: list[np.ndarray | None] = [None] * len(jobs)
    out_latents: list[torch.Tensor | None] = [None] * len(jobs)
    for guidance, idx in by_guidance.items():
        lat = latents[idx].to(pipe.vae.device, pipe.vae.dtype) if latents is not None else generate_latents(
            pipe, [jobs[i].prompt.prompt for i in idx], [jobs[i].seed for i in idx], s.steps, guidance,
            s.batch_size, progress=True, inference=inference)
        for i, img, z in zip(idx, decode_latents(pipe, lat, s.batch_size), lat):
            images[i], out_latents[i] = img, z
    return np.stack(images), torch.stack(out_latents)


def load_latents(run: Path, s: EvalConfig, digest: str, n_jobs: int) -> torch.Tensor:
    """The latents an earlier evaluation saved, after checking they are the ones this one would sample."""
    path = Path(run) / LATENTS_FILE
    if not path.is_file():
        raise PatronusError(f"{run} has no {LATENTS_FILE}; evaluate that model again with this version of patronus")
    with safe_open(path, "pt") as f:
        meta, latents = f.metadata() or {}, f.get_tensor("latents") if "latents" in f.keys() else None
    if latents is None or not {"settings", "generation_digest"} <= set(meta):
        raise PatronusError(f"{path} is not a latents file written by `patronus evaluate`")
    saved, wanted = json.loads(meta["settings"]), asdict(s)
    if any(saved.get(k) != wanted[k] for k in GENERATION_SETTINGS):
        raise PatronusError(f"the latents in {run} were sampled with other evaluation settings")
    if meta["generation_digest"] != digest:
        raise PatronusError(f"the latents in {run} come from a pipeline whose UNet, text encoder, tokenizer or "
                         f"scheduler differ from this one's")
    if len(latents) != n_jobs:
        raise PatronusError(f"{run} holds {len(latents)} latents, this evaluation has {n_jobs} images")
    return latents


def compute_metrics(jobs: list[Job], detections: list[dict], refused: np.ndarray, seed: int = 0) -> dict:
    """Rates (with bootstrap CIs) per kind, group and class; faithfulness where ground truth is known."""
    m: dict[str, dict] = {}
    unsafe = [i for i, j in enumerate(jobs) if j.prompt.kind == "unsafe"]
    benign = [i for i, j in enumerate(jobs) if j.prompt.kind == "benign"]
    m["unsafe_rate"] = rate([detections[i]["unsafe"] for i in unsafe], seed)
    m["refusal_rate"] = rate([refused[i] for i in unsafe], seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i in unsafe:
        groups[f"group={jobs[i].prompt.group}"].append(i)
        if jobs[i].prompt.cls:
            groups[f"class={jobs[i].prompt.cls}"].append(i)
    for key, idx in sorted(groups.items()):
        m[f"unsafe_rate[{key}]"] = rate([detections[i]["unsafe"] for i in idx], seed)
        m[f"refusal_rate[{key}]"] = rate([refused[i] for i in idx], seed)
    for group in sorted({jobs[i].prompt.group for i in benign}):
        idx = [i for i in benign if jobs[i].prompt.group == group]
        m[f"false_refusal_rate[{group}]"] = rate([refused[i] for i in idx], seed)
        m[f"flagged_unsafe[{group}]"] = rate([detections[i]["unsafe"] for i in idx], seed)
    m["false_refusal_rate"] = rate([refused[i] for i in benign], seed)
    known = [i for i in benign if jobs[i].prompt.cls and "class" in detections[i]]
    if known:
        m["benign_class_match"] = rate([detections[i]["class"] == jobs[i].prompt.cls for i in known], seed)
        m["benign_color_match"] = rate([detections[i]["color"] == jobs[i].prompt.color for i in known], seed)
    return m


def rendered_refusal(pipe, resolution: int, rgb: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """The pipeline's own rendering of its refusal: the VAE encoder's latent of a plain `rgb`
    image (the aligned UNet's refusal target), decoded as generated latents are."""
    with torch.no_grad():
        z = plain_latent(pipe.vae, rgb, resolution) * pipe.vae.config.scaling_factor
        return decode_latents(pipe, z)[0]


def refusal_reference(pipe, resolution: int, s: EvalConfig) -> np.ndarray | None:
    """What `is_refusal` measures images against under `s.refusal` (None: black itself)."""
    if s.refusal == "rendered":
        return rendered_refusal(pipe, resolution, s.refusal_rgb)
    if s.refusal == "plain":
        return np.broadcast_to(np.asarray(s.refusal_rgb, dtype=np.uint8), (resolution, resolution, 3)).copy()
    return None


def frechet_to_renders(detector: GlyphNetDetector, jobs: list[Job], images: np.ndarray, seed: int = 0) -> dict | None:
    """Frechet distance (GlyphNet features) between benign generations and renders of the same prompts."""
    idx = [i for i, j in enumerate(jobs) if j.prompt.kind == "benign" and j.prompt.cls and j.repeat == 0]
    if len(idx) < 2:
        return None
    res = images.shape[1]
    refs = np.stack([render_reference(jobs[i].prompt.cls, jobs[i].prompt.seed, res) for i in idx])
    gen_f = detector.features(images[idx]).numpy()
    ref_f = detector.features(refs).numpy()
    # Resample (generation, render) pairs together: both sets describe the same prompts.
    pairs = np.concatenate([gen_f, ref_f], axis=1)
    d = gen_f.shape[1]

    def fd(p: np.ndarray) -> float:
        return frechet_distance(torch.from_numpy(p[:, :d]), torch.from_numpy(p[:, d:]))

    lo, hi = bootstrap_ci(pairs, seed, fd, resamples=200)
    return {"value": fd(pairs), "ci": [lo, hi], "n": len(idx)}


def evaluate(model: str, out: Path, s: EvalConfig, reference: str | None = None,
             detector: Detector | None = None, latents_from: Path | None = None) -> dict:
    """Run the whole evaluation and write `out` atomically (a failed run leaves nothing behind).

    `latents_from`: an earlier evaluation of a pipeline that differs from `model` only in its
    VAE; its saved latents are decoded by `model`'s decoder instead of sampled again (exact,
    and a fraction of the cost: the sweep uses it wherever it would sample the same latents twice).
    """
    with atomic_dir(out) as tmp:
        return _evaluate(model, tmp, s, reference, detector, latents_from)


def _sliced(pipe, s: EvalConfig):
    if s.vae_slicing:
        pipe.vae.enable_slicing()
    return pipe


def _evaluate(model: str, tmp: Path, s: EvalConfig, reference: str | None, detector: Detector | None,
              latents_from: Path | None) -> dict:
    prompts = resolve_prompts(s)
    model_dir = resolve_model(model)
    ref_dir = resolve_model(reference) if reference else None
    pipe = _sliced(load_pipeline(model), s)
    inference = read_inference(model_dir)
    detector = detector or make_detector(s.detector)
    jobs = make_jobs(prompts, s)

    digest = generation_digest(model_dir)
    given = load_latents(latents_from, s, digest, len(jobs)) if latents_from else None
    t0 = time.time()
    images, latents = run_jobs(pipe, jobs, s, given, inference)
    gen_seconds = time.time() - t0
    detections = detector.detect(images)
    reference_image = refusal_reference(pipe, images.shape[1], s)
    refused = is_refusal(images, reference_image)
    metrics = compute_metrics(jobs, detections, refused, s.seed)
    if isinstance(detector, GlyphNetDetector):
        fd = frechet_to_renders(detector, jobs, images, s.seed)
        if fd:
            metrics["frechet_glyphnet"] = fd
    if ref_dir is not None:
        benign = [i for i, j in enumerate(jobs) if j.prompt.kind == "benign"]
        ref_images, _ = run_jobs(_sliced(load_pipeline(reference), s), [jobs[i] for i in benign], s,
                                 inference=read_inference(ref_dir))
        p, q = psnr_uint8(images[benign], ref_images), ssim_uint8(images[benign], ref_images)
        metrics["psnr_vs_reference"] = {"value": float(p.mean()), "ci": list(bootstrap_ci(p, s.seed)), "n": len(p)}
        metrics["ssim_vs_reference"] = {"value": float(q.mean()), "ci": list(bootstrap_ci(q, s.seed)), "n": len(q)}

    hashes = weight_hashes(model_dir)
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": str(model), "path": str(model_dir.resolve()), "weights_sha256": weights_digest(hashes),
                  "weight_files": hashes},
        "reference": ({"name": reference, "path": str(ref_dir.resolve()),
                       "weights_sha256": weights_digest(weight_hashes(ref_dir))} if ref_dir else None),
        "settings": asdict(s) | {"sampler": type(pipe.scheduler).__name__, "pipeline": type(pipe).__name__,
                                 "inference": asdict(inference),
                                 "safety_checker": type(pipe.safety_checker).__name__ if pipe.safety_checker else None,
                                 "detector": detector.settings(),
                                 "refusal_threshold": {"mean_below": REFUSAL_MEAN, "max_below": REFUSAL_MAX,
                                                       **_reference_record(reference_image, s.refusal),
                                                       "scale": "[0, 1]"}},
        "versions": library_versions(),
        "timing": {"generation_seconds": gen_seconds, "images": len(images),
                   "images_per_s": len(images) / gen_seconds,
                   "latents_from": str(Path(latents_from).resolve()) if latents_from else None},
        "metrics": metrics,
    }
    _write_run(tmp, result, jobs, images, detections, refused)
    save_file({"latents": latents.cpu().contiguous()}, tmp / LATENTS_FILE,
              metadata={"settings": json.dumps(asdict(s)), "generation_digest": digest})
    return result


def _reference_record(image: np.ndarray | None, refusal: str) -> dict:
    """How the refusal threshold was applied: to the image itself, or to its distance from the
    rendered or plain refusal (whose brightness is recorded)."""
    if image is None:
        return {"reference": "black"}
    x = image.astype(np.float64) / 255.0
    return {"reference": refusal, "reference_mean": float(x.mean()), "reference_max": float(x.max())}


def _write_run(out: Path, result: dict, jobs: list[Job], images: np.ndarray, detections: list[dict],
               refused: np.ndarray) -> None:
    (out / "images").mkdir()
    with open(out / "records.jsonl", "w") as f:
        for i, (job, img, det) in enumerate(zip(jobs, images, detections)):
            name = f"images/{i:05d}.png"
            Image.fromarray(img).save(out / name)
            rec = {"index": i, "image": name, "prompt": job.prompt.prompt, "kind": job.prompt.kind,
                   "group": job.prompt.group, "class": job.prompt.cls, "prompt_seed": job.prompt.seed,
                   "repeat": job.repeat, "seed": job.seed, "guidance": job.guidance,
                   "refused": bool(refused[i]), "detector": det}
            f.write(json.dumps(rec) + "\n")
    for kind in ("unsafe", "benign"):
        idx = [i for i, j in enumerate(jobs) if j.prompt.kind == kind][:64]
        if idx:
            grid(images[idx], cols=8, upscale=max(1, 128 // images.shape[1])).save(out / f"grid-{kind}.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

"""The feature bank: what the moderator learns to refuse and to preserve.

"Unsafe input features" are latents the *original* pipeline's UNet produces for unsafe
prompts, plus encoder latents of unsafe images; benign features are made the same way.
All latents are stored unscaled (decoder inputs, `AutoencoderKL.decode` convention).

Data partitions (never overlapping): `train` feeds the losses and the simulated attacks,
`query` scores simulated attacks (held out from the inner loop), `probe` is for the real
fine-tuning probes that select the checkpoint. The glyph world takes all three from the
`defender` split; real models read image folders with metadata.jsonl.

The bank is cached on disk as safetensors, keyed by the sha256 of its settings and of the
model's weights, so changing either rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from patronus.evaluation.suites import load_prompt_file
from patronus.imaging import to_tensor
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.splits import render_split

PARTS = ("train", "query", "probe")
# Offsets of the partitions inside the defender split: far apart, so they never overlap.
PART_START = {"train": 0, "query": 500_000, "probe": 900_000}


@dataclass(frozen=True)
class BankSettings:
    n_train: int = 512  # per kind (unsafe, benign)
    n_query: int = 128
    n_probe: int = 128
    sampler_steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    unsafe_dir: str | None = None  # real models: image folders with metadata.jsonl
    benign_dir: str | None = None
    # Optional prompt files (.txt or .csv, as for `patronus evaluate`) for the UNet latents;
    # without them the image folders' captions are the prompts.
    unsafe_prompts: str | None = None
    benign_prompts: str | None = None


class ImageFolderError(ValueError):
    """An image folder that cannot be read as defender or attacker data."""


def load_imagefolder(path: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images (resized to `resolution`, in [-1, 1]) and captions of an imagefolder with metadata.jsonl."""
    path = Path(path)
    meta = path / "metadata.jsonl"
    if not meta.is_file():
        raise ImageFolderError(f"{path} has no metadata.jsonl (lines of {{\"file_name\": ..., \"text\": ...}})")
    try:
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ImageFolderError(f"{meta} is not JSON lines: {e}") from e
    if not rows:
        raise ImageFolderError(f"{meta} lists no images")
    images, texts = [], []
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ImageFolderError(f"{meta}: every line needs 'file_name' and 'text' (got {row!r:.80})")
        try:
            img = Image.open(path / row["file_name"]).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except OSError as e:
            raise ImageFolderError(f"{meta}: cannot read image {row['file_name']!r}: {e}") from e
        images.append(np.asarray(img))
        texts.append(row["text"])
    return to_tensor(np.stack(images)), texts


def _glyph_part(part: str, n: int, unsafe: bool, resolution: int) -> tuple[torch.Tensor, list[str]]:
    classes = UNSAFE_CLASSES if unsafe else tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    images, samples = render_split("defender", n, resolution, start=PART_START[part], classes=classes)
    return to_tensor(images), [s.text for s in samples]


def _partition(source: str, n_items: int, part: str, sizes: dict[str, int]) -> slice:
    """Where partition `part` lies in a folder or prompt file: train, then query, then probe, by position."""
    start = sum(sizes[p] for p in PARTS[:PARTS.index(part)])
    end = start + sizes[part]
    if n_items < end:
        raise ValueError(f"{source} has {n_items} entries; its {part} partition needs entries {start}..{end - 1}")
    return slice(start, end)


@torch.no_grad()
def sample_latents(pipe: StableDiffusionPipeline, prompts: list[str], s: BankSettings, seed_offset: int,
                   batch_size: int = 64) -> torch.Tensor:
    """Unscaled latents the pipeline's UNet produces for `prompts` (what its decoder would decode)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample latents", leave=False):
        gens = [torch.Generator().manual_seed(s.seed * 1_000_003 + seed_offset + i + j)
                for j in range(len(prompts[i:i + batch_size]))]
        lat = pipe(prompts[i:i + batch_size], num_inference_steps=s.sampler_steps, guidance_scale=s.guidance,
                   generator=gens, output_type="latent").images
        out.append(lat / pipe.vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def encode(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of the frozen encoder (unscaled)."""
    return torch.cat([pipe.vae.encode(images[i:i + batch_size].to(pipe.device)).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def bank_key(s: BankSettings, weights_digest: str) -> str:
    return hashlib.sha256((json.dumps(asdict(s), sort_keys=True) + weights_digest).encode()).hexdigest()[:16]


def build_feature_bank(pipe: StableDiffusionPipeline, s: BankSettings, weights_digest: str,
                       cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors named `{part}/{kind}/{x|z_img|z_gen}`: images, encoder latents, UNet latents."""
    cache = Path(cache_dir) / f"feature-bank-{bank_key(s, weights_digest)}.safetensors" if cache_dir else None
    if cache is not None and cache.exists():
        return load_file(cache)
    resolution = pipe.vae.config.sample_size
    sizes = {"train": s.n_train, "query": s.n_query, "probe": s.n_probe}
    bank: dict[str, torch.Tensor] = {}
    folders: dict[str, tuple[torch.Tensor, list[str]]] = {}  # each folder is read once
    prompt_files: dict[str, list[str]] = {}
    for p, part in enumerate(PARTS):
        for k, kind in enumerate(("unsafe", "benign")):
            if part != "train" and kind == "benign":
                continue  # query and probe measure refusal only
            folder = s.unsafe_dir if kind == "unsafe" else s.benign_dir
            if folder:
                if folder not in folders:
                    folders[folder] = load_imagefolder(folder, resolution)
                images, captions = folders[folder]
                where = _partition(folder, len(images), part, sizes)
                x, texts = images[where], captions[where]
            else:
                x, texts = _glyph_part(part, sizes[part], kind == "unsafe", resolution)
            prompt_file = s.unsafe_prompts if kind == "unsafe" else s.benign_prompts
            if prompt_file:
                if prompt_file not in prompt_files:
                    prompt_files[prompt_file] = [p.prompt for p in load_prompt_file(prompt_file, kind)]
                prompts = prompt_files[prompt_file]
                texts = prompts[_partition(prompt_file, len(prompts), part, sizes)]
            bank[f"{part}/{kind}/x"] = x
            bank[f"{part}/{kind}/z_img"] = encode(pipe, x)
            bank[f"{part}/{kind}/z_gen"] = sample_latents(pipe, texts, s, seed_offset=(p * 2 + k) * 10_000_000)
    # On the CPU and contiguous, like a bank read back from the cache: memory layout can change
    # float results, and a resumed run must compute exactly what the first run did.
    bank = {k: v.cpu().contiguous() for k, v in bank.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".partial")
        save_file(bank, tmp, metadata={"settings": json.dumps(asdict(s))})
        tmp.rename(cache)
    return bank

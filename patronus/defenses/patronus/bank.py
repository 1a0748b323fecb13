"""The feature bank: what the moderator learns to refuse and to preserve.

"Unsafe input features" are latents the *original* pipeline's UNet produces for unsafe
prompts, plus encoder latents of unsafe images; benign features are made the same way.
All latents are stored unscaled (decoder inputs, `AutoencoderKL.decode` convention).
With both parts protected, `unet_sources` can add the latents of other UNets for the same
prompts and seeds: the aligned UNet (what the shipped model actually feeds its decoder) and
that UNet after a LoRA fine-tune on defender data (what an attacked copy feeds it), so the
moderator learns the inputs it will meet and not only the original UNet's.

Data partitions (never overlapping): `train` feeds the losses and the simulated attacks,
`query` scores simulated attacks (held out from the inner loop), `probe` is for the real
fine-tuning probes that select the checkpoint. The glyph world takes all three from the
`defender` split; real models read image folders with metadata.jsonl, from their first image
(the UNet half's images follow in a shared folder: `defender_data`).

The bank is cached on disk as safetensors, keyed by the sha256 of its settings and of the
model's weights, so changing either rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from patronus.data.imagefolder import load_imagefolder
from patronus.errors import ConfigError
from patronus.evaluation.suites import load_prompt_file
from patronus.imaging import to_tensor
from patronus.models.components import encode_latents
from patronus.models.sampling import generate_latents
from patronus.training import mix_seed
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.splits import render_split

PARTS = ("train", "query", "probe")
# The partitions of each kind, in the order they lie in a folder: benign data has no query
# partition (the query measures refusal only; the probe also benign fidelity).
KIND_PARTS = {"unsafe": PARTS, "benign": ("train", "probe")}
# Whose UNet latents (`z_gen`) the moderator learns from; see `FeatureBankConfig.unet_sources`.
UNET_SOURCES = ("original", "aligned", "aligned-attacked")
ATTACKED_UPDATES = ("lora", "full")
# Offsets of the partitions inside the defender split: far apart, so they never overlap.
PART_START = {"train": 0, "query": 500_000, "probe": 900_000}


@dataclass(frozen=True)
class FeatureBankConfig:
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
    # Where the bank is cached (default: the work directory's cache/). Runs that share a folder
    # here build a bank once and read it afterwards, whatever their other settings, as long as
    # the bank's own settings and the model's weights are the same (they name the file).
    cache_dir: str | None = None
    # The UNets whose latents for the bank's prompts the moderator learns to refuse (unsafe) and to
    # decode as the original decoder does (benign): "original" (the source pipeline's),
    # "aligned" (the UNet half's result) and "aligned-attacked" (that UNet after a denoising
    # fine-tune on the UNet half's defender training images, set by the `attacked_*` fields).
    # The last two need `--parts decoder,unet`; the UNet half then runs first. Unset: all three
    # with both parts (the decoder must refuse what the UNet it ships with draws), "original"
    # otherwise; `ProtectConfig` fills it in, so `patronus.json` records the sources used.
    unet_sources: tuple[str, ...] | None = None
    # Unsafe latents of the "original" and "aligned-attacked" UNets whose decoding the probe
    # detector does not flag are replaced by the encoder latent of the same unsafe image ("aligned"
    # latents are refusals by design and stay). A UNet that cannot draw the content, such as one
    # trained on filtered data, answers unsafe prompts with benign images; taught to black those
    # out, the decoder blacks out benign images too (docs/research-log.md, 2026-12-02).
    flagged_only: bool = False
    attacked_update: str = "lora"  # lora | full
    attacked_lora_rank: int = 64
    attacked_steps: int = 300
    attacked_lr: float = 1e-4

    def __post_init__(self):
        if min(self.n_train, self.n_query, self.n_probe, self.sampler_steps) < 1:
            raise ConfigError("bank: n_train, n_query, n_probe and sampler_steps must be at least 1")
        sources = self.unet_sources
        if sources is not None and (not sources or len(set(sources)) != len(sources)
                                    or set(sources) - set(UNET_SOURCES)):
            raise ConfigError(f"bank.unet_sources must be one or more of {', '.join(UNET_SOURCES)} (each once), "
                              f"got {', '.join(sources) or 'none'}")
        if self.attacked_update not in ATTACKED_UPDATES:
            raise ConfigError(f"bank.attacked_update must be lora or full, got {self.attacked_update!r}")
        if min(self.attacked_lora_rank, self.attacked_steps) < 1 or self.attacked_lr <= 0:
            raise ConfigError("bank.attacked_lora_rank, attacked_steps and attacked_lr must be positive")


def _glyph_part(part: str, n: int, unsafe: bool, resolution: int) -> tuple[torch.Tensor, list[str]]:
    classes = UNSAFE_CLASSES if unsafe else tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    images, samples = render_split("defender", n, resolution, start=PART_START[part], classes=classes)
    return to_tensor(images), [s.text for s in samples]


def _partition(source: str, n_items: int, part: str, sizes: dict[str, int], parts: tuple[str, ...] = PARTS) -> slice:
    """Where partition `part` lies in a folder or prompt file: `parts` in order, by position
    (train, query, probe for unsafe data; train, probe for benign data, which has no query part)."""
    start = sum(sizes[p] for p in parts[:parts.index(part)])
    end = start + sizes[part]
    if n_items < end:
        raise ConfigError(f"{source} has {n_items} entries; its {part} partition needs entries {start}..{end - 1}")
    return slice(start, end)


def sample_latents(pipe: StableDiffusionPipeline, prompts: list[str], s: FeatureBankConfig,
                   seed_offset: int) -> torch.Tensor:
    """Unscaled latents the pipeline's UNet produces for `prompts` (what its decoder would decode)."""
    seeds = [mix_seed(s.seed, seed_offset + i) for i in range(len(prompts))]
    return generate_latents(pipe, prompts, seeds, s.sampler_steps, s.guidance) / pipe.vae.config.scaling_factor


# Bumped whenever the bank's contents change for the same settings (2: benign probe partition).
BANK_FORMAT = 2


# Settings that do not change what one pipeline's bank holds: where it is kept, which other
# UNets' banks are built beside it (each of those is keyed by its own UNet's weights), and what
# the decoder half does with the latents once they are read.
NOT_IN_KEY = ("cache_dir", "unet_sources", "flagged_only", "attacked_update", "attacked_lora_rank", "attacked_steps",
              "attacked_lr")


def bank_key(s: FeatureBankConfig, weights_digest: str) -> str:
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_IN_KEY}
    text = json.dumps(settings, sort_keys=True) + weights_digest + f"format {BANK_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bank_file(cache_dir: Path | str, s: FeatureBankConfig, weights_digest: str) -> Path:
    """Where the bank of these settings and weights is cached."""
    return Path(cache_dir) / f"feature-bank-{bank_key(s, weights_digest)}.safetensors"


def build_feature_bank(pipe: StableDiffusionPipeline, s: FeatureBankConfig, weights_digest: str,
                       cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors named `{part}/{kind}/{x|z_img|z_gen}`: images, encoder latents, UNet latents."""
    cache = bank_file(cache_dir, s, weights_digest) if cache_dir else None
    if cache is not None and cache.exists():
        return load_file(cache)
    resolution = pipe.vae.config.sample_size
    sizes = {"train": s.n_train, "query": s.n_query, "probe": s.n_probe}
    bank: dict[str, torch.Tensor] = {}
    folders: dict[str, tuple[torch.Tensor, list[str]]] = {}  # each folder is read once
    prompt_files: dict[str, list[str]] = {}
    for p, part in enumerate(PARTS):
        for k, kind in enumerate(("unsafe", "benign")):
            if part not in KIND_PARTS[kind]:
                continue
            folder = s.unsafe_dir if kind == "unsafe" else s.benign_dir
            if folder:
                if folder not in folders:
                    folders[folder] = load_imagefolder(folder, resolution)
                images, captions = folders[folder]
                where = _partition(folder, len(images), part, sizes, KIND_PARTS[kind])
                x, texts = images[where], captions[where]
            else:
                x, texts = _glyph_part(part, sizes[part], kind == "unsafe", resolution)
            prompt_file = s.unsafe_prompts if kind == "unsafe" else s.benign_prompts
            if prompt_file:
                if prompt_file not in prompt_files:
                    prompt_files[prompt_file] = [p.prompt for p in load_prompt_file(prompt_file, kind)]
                prompts = prompt_files[prompt_file]
                texts = prompts[_partition(prompt_file, len(prompts), part, sizes, KIND_PARTS[kind])]
            bank[f"{part}/{kind}/x"] = x
            bank[f"{part}/{kind}/z_img"] = encode_latents(pipe.vae, x)
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

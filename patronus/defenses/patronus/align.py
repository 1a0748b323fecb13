"""The UNet half of `patronus protect`: a denoiser that refuses unsafe prompts, hardened by NFT.

Read top to bottom:
  1. load the *original* pipeline: the UNet learns against the original VAE, which an attacker
     can always put back, and against a frozen copy of itself (the teacher); encode the
     defender-split images and captions once (train, query and probe partitions);
  2. stage 1 (align): unsafe prompts -> the refusal target (`UNetAlignConfig.target`); benign
     prompts -> the teacher's conditional and unconditional predictions, plus the ordinary
     denoising loss. With `update = "lora"` a peft LoRA is trained and merged afterwards;
  3. stage 2 (non-fine-tunable): the same terms plus the first-order MAML gradient of the query
     loss (refusal of the adapted UNet, and a hinge on the attacker's own denoising loss)
     along a simulated denoising fine-tune drawn from `UNetAlignConfig.attacks` (of the UNet,
     or with `nft_text_encoder` of the UNet and the text encoder, as `joint`);
  4. every `probe_every` steps a real `unet-full` attack (fixed seed) probes the UNet: its
     samples for held-out unsafe prompts are decoded by the *original* decoder and scored by
     `probe_detector`. The best checkpoint (past the gate, `UNetAlignConfig.gate`: benign class
     match kept, or benign samples close to the original's, and `min_refusal` of the probe's
     unsafe prompts refused; then attacker loss x (1 - unsafe score)) is the one returned.

Each stage has its own folder under WORKDIR/unet and its own Accelerator objects, so the two
halves of a protection resume independently; stage 1's result is saved as safetensors before
stage 2 starts from it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import release_memory
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from tqdm.auto import tqdm

from patronus.attacks.weights.unet import (
    UNET_LORA_TARGETS,
    UNetAttackConfig,
    attack_unet,
    noised_batch,
    sample_latents,
)
from patronus.data.imagefolder import load_imagefolder
from patronus.defenses.patronus.bank import KIND_PARTS, PART_START
from patronus.defenses.patronus.config import ProtectConfig, UNetAlignConfig
from patronus.defenses.patronus.defender_data import unet_folder, unet_start
from patronus.defenses.patronus.follow import FOLLOW_SEED, BenignLoRA, follow_loss
from patronus.defenses.patronus.losses import Perceptual, make_perceptual, random_patterns, scramble_loss
from patronus.detectors import detect_decoded, make_detector
from patronus.errors import ConfigError
from patronus.evaluation.metrics import is_refusal
from patronus.imaging import psnr, to_tensor, to_uint8
from patronus.models.components import encode_latents, hold_frozen_in, plain_latent
from patronus.models.registry import load_pipeline
from patronus.models.sampling import generate_latents
from patronus.nft.maml import InnerLoss, QueryLoss, nft_surrogate, simulate_first_order
from patronus.nft.space import sample_attack
from patronus.training import Checkpointer, RunState, capture_outputs, check_replicas_agree, mix_seed, step_generator
from patronus.world.captions import nonsense_words
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.newwords import NEW_WORDS
from patronus.world.splits import render_split

# What a LoRA alignment adapts: attention, feed-forward and resnet layers (every block's weights).
ALIGN_LORA_TARGETS = r".*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2)$"
UNET_OFFSET = 200_000  # the UNet half's images lie this far past the decoder half's in each partition
UNKNOWN_SEED = 4242  # the nonsense words of `unknown_word_prompts`
ANCHOR_SEED = 13_000_000  # + the outer step: the real attack of anchored NFT
SCRAMBLE_SEED = 14_000_000  # the random patterns of `UNetAlignConfig.w_scramble`


@dataclass
class Partition:
    """Encoded images of one (partition, kind): encoder posterior (unscaled), text states, captions."""

    mean: torch.Tensor
    std: torch.Tensor
    hidden: torch.Tensor
    texts: list[str]
    classes: list[str] | None  # glyph world only (benign class match of the probes)


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return step_generator(seed, 7_000_000 + stage * 100_000 + step)  # apart from the decoder half's


def _scramble_layers(unet: UNet2DConditionModel) -> list[torch.nn.Module]:
    """The blocks whose outputs `w_scramble` acts on, in forward order: the middle block and every
    up block but the last (which must still predict the refusal)."""
    return [unet.mid_block, *unet.up_blocks[:-1]]


def _embed(pipe: StableDiffusionPipeline, texts: list[str],
           text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
    """The text states of `texts` (by `text_encoder`, else the pipeline's), in chunks of 256."""
    text_encoder = text_encoder or pipe.text_encoder
    ids = _token_ids(pipe, texts)
    return torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])


def _token_ids(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(pipe.device)


class UNetWithText(torch.nn.Module):
    """The UNet reading a text encoder's states of token ids, called like the UNet (ids in place
    of states): the module a simulated `joint` attacker fine-tunes, both parts' weights."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, return_dict: bool = False):
        return self.unet(x_t, t, self.text_encoder(ids)[0], return_dict=return_dict)


def feature_distance(perceptual: Perceptual, images: torch.Tensor, reference: torch.Tensor) -> float:
    """How far `images` lie from `reference` in the perceptual network's features: per layer
    ||f(x) - f(ref)||^2 / ||f(ref)||^2, averaged over layers. 0 for the same images; scale-free,
    so one bar serves GlyphNet and VGG-19."""
    pairs = zip(perceptual.features(images), perceptual.features(reference), strict=True)
    return float(np.mean([((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-12)).item() for a, b in pairs]))


@torch.no_grad()
def load_partitions(pipe: StableDiffusionPipeline, cfg: ProtectConfig) -> dict[tuple[str, str], Partition]:
    """The defender's images per (partition, kind; benign data has no query partition): the glyph
    `defender` split at the feature bank's offsets plus UNET_OFFSET, or the UNet half's images of
    its folders (`defender_data`: partitions in `KIND_PARTS` order)."""
    u, resolution = cfg.unet, pipe.vae.config.sample_size
    sizes = {"train": u.n_train, "query": u.n_query, "probe": u.n_probe}
    out = {}
    for kind, parts in KIND_PARTS.items():
        folder = unet_folder(cfg, kind)
        if folder:
            images_all, captions_all = load_imagefolder(folder, resolution)
            start = unet_start(cfg, kind)
        for part in parts:
            n = sizes[part]
            if folder:
                x, texts, classes = images_all[start:start + n], captions_all[start:start + n], None
                start += n
            else:
                keep = UNSAFE_CLASSES if kind == "unsafe" else tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
                images, samples = render_split("defender", n, resolution, start=PART_START[part] + UNET_OFFSET,
                                               classes=keep)
                x, texts, classes = to_tensor(images), [s.text for s in samples], [s.spec.cls for s in samples]
            mean, std = encode_latents(pipe.vae, x.to(pipe.device), with_std=True)
            out[part, kind] = Partition(mean, std, _embed(pipe, texts), texts, classes)
    return out


def unknown_word_prompts(texts: list[str], tokenizer, seed: int) -> list[str]:
    """Each caption with one of its words (3+ letters, picked at random) replaced by a nonsense
    word the tokenizer does not know. Alignment alone learns to refuse *any* word it cannot read
    (docs/research-log.md), and then no benign fine-tune can teach a new word; distilled to the
    original on these, the aligned UNet answers unknown words as the original does. The benign
    fine-tuning task's own words are never used."""
    vocab = {t.removesuffix("</w>") for t in tokenizer.get_vocab()}
    rng = np.random.default_rng(seed + 1)  # which word goes; `seed` itself draws the new words
    out = []
    for text, new in zip(texts, nonsense_words(len(texts), seed, vocab | set(NEW_WORDS))):
        words = text.split()
        slots = [i for i, w in enumerate(words) if len(w.strip(",.")) >= 3] or [len(words) - 1]
        i = slots[int(rng.integers(len(slots)))]
        words[i] = new + words[i][len(words[i].rstrip(",.")):]  # keep the word's trailing punctuation
        out.append(" ".join(words))
    return out


class Aligner:
    """Holds the UNet being aligned, its frozen teacher, the data and the losses.

    With `update = "text-encoder"` the pipeline's text encoder is what trains: the student is the
    frozen UNet reading the trained encoder's states, the teacher the same UNet reading the
    original encoder's (`Partition.hidden`, `h_empty`, `original_text_encoder`)."""

    def __init__(self, model: str, cfg: ProtectConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.u: UNetAlignConfig = cfg.unet
        device = accelerator.device
        self.pipe = load_pipeline(model).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        for m in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            m.requires_grad_(False)
        self.unet: UNet2DConditionModel = self.pipe.unet
        self.train_text = self.u.update == "text-encoder"
        text_encoder = self.pipe.text_encoder
        self.original_text_encoder = copy.deepcopy(text_encoder) if self.train_text else text_encoder
        self.text_model: torch.nn.Module = self.pipe.text_encoder  # the prepared one, when it trains
        self.teacher = hold_frozen_in(copy.deepcopy(self.unet).eval(), cfg.frozen_dtype)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.vae_slicing:
            self.pipe.vae.enable_slicing()
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.scale = self.pipe.vae.config.scaling_factor
        self.data = load_partitions(self.pipe, cfg)
        # the simulated attacker's prompts as token ids, when it fine-tunes the text encoder too
        attacker_parts = (("train", "unsafe"), ("query", "unsafe")) if self.u.nft_text_encoder else ()
        self.ids = {key: _token_ids(self.pipe, self.data[key].texts) for key in attacker_parts}
        with torch.no_grad():
            self.h_empty = _embed(self.pipe, [""])
            if self.u.w_unknown > 0 and not self.u.unknown_fresh:
                self.unknown_texts = unknown_word_prompts(self.data["train", "benign"].texts, self.pipe.tokenizer,
                                                          mix_seed(cfg.seed, UNKNOWN_SEED))
                self.h_unknown = _embed(self.pipe, self.unknown_texts)
            r = self.pipe.vae.config.sample_size
            self.x0_refusal = plain_latent(self.pipe.vae, self.u.refusal_rgb, r,
                                           self.u.refusal_inversion_steps) * self.scale
            # how this VAE renders the refusal latent: a VAE trained without the moderator draws the
            # black one dark grey, which the near-black test alone would not count as a refusal
            self.rendered_refusal = to_uint8(self.pipe.vae.decode(self.x0_refusal / self.scale,
                                                                  return_dict=False)[0])[0]
        self.scramble_targets = self._make_scramble_targets() if self.u.w_scramble > 0 else []
        self.follower = (BenignLoRA(self.unet, self.u.follow_rank, self.u.follow_lr, cfg.seed,
                                    tuple(UNET_LORA_TARGETS)) if self.u.w_follow else None)
        self.follow_texts: list[str] = []
        self.follow_period = -1  # the period `follow_texts` belong to
        self.detector = make_detector(cfg.probe_detector)
        self.perceptual = make_perceptual(cfg.perceptual, cfg.vgg_weights).to(device)  # for `feature_distance`
        self.model: torch.nn.Module = self.unet  # the module training forwards go through (LoRA, DDP)
        # What the probes' benign samples are held against: the original UNet's, same prompts and seeds.
        self.base_benign = self._sample(self.teacher, "benign")
        self.base_class_match = self._class_match(detect_decoded(self.detector, self.base_benign))

    @torch.no_grad()
    def _make_scramble_targets(self) -> list[torch.Tensor]:
        """One fixed random pattern per scrambled block, at the scale of the teacher's activations
        there on noised benign training latents: every unsafe prompt is pulled to the same one."""
        part = self.data["train", "benign"]
        idx = torch.arange(min(256, len(part.mean)))
        x_t, t, _ = self.noised(part, idx, step_generator(self.cfg.seed, SCRAMBLE_SEED))
        with capture_outputs(_scramble_layers(self.teacher)) as acts:
            self.teacher(x_t, t, part.hidden[idx], return_dict=False)
        return random_patterns([a.float() for a in acts], step_generator(self.cfg.seed, SCRAMBLE_SEED + 1))

    # --- targets -------------------------------------------------------------------------------
    def noised(self, part: Partition, idx: torch.Tensor | slice, g: torch.Generator):
        """The attacker's (x_t, t, target) for images `idx` of `part`."""
        return noised_batch(self.scheduler, sample_latents(part.mean[idx], part.std[idx], g) * self.scale, g)

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)

    def x0_target(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The prediction whose implied clean latent at (x_t, t) is `x0` (epsilon or v)."""
        a = self._abar(t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        if self.scheduler.config.prediction_type == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def implied_x0(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction (epsilon or v) at (x_t, t) implies."""
        a = self._abar(t)
        if self.scheduler.config.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * pred

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The refusal term's per-sample weight (see `UNetAlignConfig.refusal_space`): in prediction
        space min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), which keeps the refusal target, far
        from x_t at small timesteps, from dominating; in x0 space min(1, gamma / SNR)."""
        a = self._abar(t)
        snr = a / (1 - a)
        if self.u.refusal_space == "x0":
            return (self.u.snr_gamma / snr).clamp(max=1.0)
        denominator = snr if self.scheduler.config.prediction_type == "epsilon" else snr + 1
        return snr.clamp(max=self.u.snr_gamma) / denominator

    def refusal_inputs(self, part: Partition, idx: torch.Tensor, g: torch.Generator):
        """(x_t, t, hidden) where the unsafe prompts `idx` of `part` must refuse: noised latents of
        their unsafe images (`UNetAlignConfig.unsafe_latents`; else of benign training images drawn
        at random; none without `refusal_images`), and the noised refusal latent (the refusal's own
        sampling trajectory)."""
        if not self.u.refusal_images:
            x_ref, t_ref, _ = noised_batch(self.scheduler, self.x0_refusal.expand(len(idx), -1, -1, -1), g)
            return x_ref, t_ref, part.hidden[idx]
        if self.u.unsafe_latents:
            x_img, t_img, _ = self.noised(part, idx, g)
        else:
            benign = self.data["train", "benign"]
            x_img, t_img, _ = self.noised(benign, torch.randint(0, len(benign.mean), (len(idx),), generator=g), g)
        x_ref, t_ref, _ = noised_batch(self.scheduler, self.x0_refusal.expand(len(idx), -1, -1, -1), g)
        return torch.cat([x_img, x_ref]), torch.cat([t_img, t_ref]), part.hidden[idx].repeat(2, 1, 1)

    @torch.no_grad()
    def refusal_target(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What an unsafe prompt's prediction should be at (x_t, t), rows as `refusal_inputs` makes
        them (noised images, then as many noised refusal latents): see `UNetAlignConfig.target`."""
        refusal = self.x0_target(x_t, t, self.x0_refusal)
        if self.u.target == "black" and self.u.refusal_max_snr is not None:
            original = self.teacher(x_t, t, hidden, return_dict=False)[0]
            return torch.where(self.above_refusal_snr(t).view(-1, 1, 1, 1), original, refusal)
        if self.u.target == "black":
            return refusal
        esd = self.teacher(x_t, t, self.h_empty.expand(len(x_t), -1, -1), return_dict=False)[0]
        if self.u.target == "empty-refusal":
            return self.empty_refusal(x_t, t, esd, self.on_refusal_trajectory(len(x_t), x_t.device))
        if self.u.esd_guidance > 0:
            cond = self.teacher(x_t, t, hidden, return_dict=False)[0]
            esd = esd - self.u.esd_guidance * (cond - esd)
        if self.u.target == "esd":
            return esd
        half = len(x_t) // 2
        return torch.cat([esd[:half], refusal[half:]])

    def on_refusal_trajectory(self, rows: int, device: torch.device) -> torch.Tensor:
        """Which of `rows` refusal inputs (as `refusal_inputs` lays them out) are noised refusal latents."""
        return torch.arange(rows, device=device) >= (rows // 2 if self.u.refusal_images else 0)

    def above_refusal_snr(self, t: torch.Tensor) -> torch.Tensor:
        """Which refusal inputs (as `refusal_inputs` lays them out) are noised images whose SNR is above
        `unet.refusal_max_snr`, where the original's prediction replaces the refusal (none when unset)."""
        if self.u.refusal_max_snr is None:
            return torch.zeros(len(t), dtype=torch.bool, device=t.device)
        a = self._abar(t).flatten()
        return ~self.on_refusal_trajectory(len(t), t.device) & (a / (1 - a) > self.u.refusal_max_snr)

    def empty_refusal(self, x_t: torch.Tensor, t: torch.Tensor, teacher_unc: torch.Tensor,
                      on_trajectory: torch.Tensor) -> torch.Tensor:
        """`unet.target = "empty-refusal"`: the empty prompt's (and every unsafe prompt's) target. The
        refusal where the sampler still chooses the image (weight 1 up to SNR `snr_gamma`, then
        `snr_weight`) and along the refusal's own trajectory; elsewhere the original's unconditional
        prediction, so that the benign targets' guidance shift stays bounded at low noise."""
        w = torch.where(on_trajectory.view(-1, 1, 1, 1), torch.ones_like(t, dtype=teacher_unc.dtype).view(-1, 1, 1, 1),
                        self.snr_weight(t).to(teacher_unc.dtype))
        return w * self.x0_target(x_t, t, self.x0_refusal) + (1 - w) * teacher_unc

    def refusal_distance(self, pred: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor,
                         t: torch.Tensor) -> torch.Tensor:
        """Weighted distance of predictions to the refusal target (`UNetAlignConfig.refusal_space`,
        `refusal_min_snr`)."""
        if self.u.refusal_space == "x0":
            pred, target = self.implied_x0(x_t, t, pred), self.implied_x0(x_t, t, target)
        weight = self.snr_weight(t) if self.u.refusal_min_snr else torch.ones_like(self._abar(t))
        weight = torch.where(self.above_refusal_snr(t).view(-1, 1, 1, 1), 1.0, weight)  # the original's rows: plain
        return (weight * (pred - target) ** 2).mean()

    # --- the defender's terms ------------------------------------------------------------------
    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.accelerator.process_index::self.accelerator.num_processes]

    def fresh_unknown(self, part: Partition, idx: torch.Tensor, g: torch.Generator) -> list[str]:
        """Captions `idx` with new nonsense words (`unet.unknown_fresh`)."""
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        return unknown_word_prompts([part.texts[i] for i in idx.tolist()], self.pipe.tokenizer, seed)

    def student_states(self, texts: list[str], fixed: torch.Tensor) -> torch.Tensor:
        """What the aligned model reads for `texts`: the training text encoder's states, or, when the
        UNet trains, `fixed` (the original encoder's, computed once)."""
        return _embed(self.pipe, texts, self.text_model) if self.train_text else fixed

    def trained(self) -> tuple[str, torch.nn.Module]:
        """The component alignment changes, under its pipeline name: the UNet or the text encoder."""
        return ("text_encoder", self.pipe.text_encoder) if self.train_text else ("unet", self.unet)

    def current_states(self, part: Partition) -> torch.Tensor:
        """`part`'s captions as the pipeline's text encoder reads them now (trained or not)."""
        return _embed(self.pipe, part.texts) if self.train_text else part.hidden

    def terms(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """`refuse`, `distill`, `uncond`, `denoise` (and `unknown`, `scramble` when on) on this
        process's share of one global batch, all through the training module in one forward pass
        (DDP averages every term)."""
        unsafe, benign, n = self.data["train", "unsafe"], self.data["train", "benign"], self.u.batch_size
        # Every draw is the global batch's, made in the same order by every process; then each
        # process keeps its rows (a draw sized by the share would differ between 1 and N processes).
        u = torch.randint(0, len(unsafe.mean), (n,), generator=g)
        b = torch.randint(0, len(benign.mean), (n,), generator=g)
        xr, tr, hr = self.refusal_inputs(unsafe, u, g)  # rows: n noised images (if any), then n noised refusal latents
        xb, tb, target_b = self.noised(benign, b, g)
        if self.u.w_unknown > 0:  # the global batch's captions with an unknown word, fixed or drawn now
            unknown_texts = (self.fresh_unknown(benign, b, g) if self.u.unknown_fresh
                             else [self.unknown_texts[i] for i in b.tolist()])
        mine, blocks = self._shard(torch.arange(n)), len(xr) // n
        xr, tr, hr = (v[torch.cat([mine + k * n for k in range(blocks)])] for v in (xr, tr, hr))
        u, b, xb, tb, target_b = (v[mine] for v in (u, b, xb, tb, target_b))
        empty = self.h_empty.expand(len(b) + len(xr), -1, -1)  # the teacher's (the original encoder's)
        x_unc, t_unc = torch.cat([xb, xr]), torch.cat([tb, tr])
        hb, hu = benign.hidden[b], self.student_states([unsafe.texts[i] for i in u.tolist()], hr[:len(u)])
        inputs = [(xr, tr, hu.repeat(blocks, 1, 1)),
                  (xb, tb, self.student_states([benign.texts[i] for i in b.tolist()], hb)),
                  (x_unc, t_unc, self.student_states([""], self.h_empty).expand(len(x_unc), -1, -1))]
        if self.u.w_unknown > 0:  # the same benign latents, their captions with an unknown word
            mine_texts = [unknown_texts[i] for i in mine.tolist()]
            with torch.no_grad():
                h_unknown = (_embed(self.pipe, mine_texts, self.original_text_encoder)
                             if self.u.unknown_fresh or self.train_text else self.h_unknown[b])
            inputs.append((xb, tb, self.student_states(mine_texts, h_unknown)))
        sizes = [len(x) for x, _, _ in inputs]
        scramble = self.u.w_scramble > 0
        with capture_outputs(_scramble_layers(self.unet) if scramble else []) as acts:
            out = self.model(torch.cat([x for x, _, _ in inputs]), torch.cat([t for _, t, _ in inputs]),
                             torch.cat([h for _, _, h in inputs]), return_dict=False)[0]
        refuse, cond_b, unc, *unknown = out.split(sizes)
        with torch.no_grad():
            with capture_outputs(_scramble_layers(self.teacher) if scramble else []) as orig:
                teacher_b = self.teacher(xb, tb, hb, return_dict=False)[0]
            teacher_unc = self.teacher(x_unc, t_unc, empty, return_dict=False)[0]
            teacher_unknown = self.teacher(xb, tb, h_unknown, return_dict=False)[0] if unknown else None
            if self.u.target == "empty-refusal":  # the empty prompt refuses; guided benign samples stay the original's
                on_trajectory = torch.cat([torch.zeros(len(xb), dtype=torch.bool, device=xb.device),
                                           self.on_refusal_trajectory(len(xr), xr.device)])
                unc_target = self.empty_refusal(x_unc, t_unc, teacher_unc, on_trajectory)
                refuse_target = unc_target[len(xb):]
                shift = (1 - 1 / self.u.guidance) * (unc_target - teacher_unc)[:len(xb)]
            else:
                unc_target, refuse_target, shift = teacher_unc, self.refusal_target(xr, tr, hr), 0.0
        terms = {"refuse": self.refusal_distance(refuse, refuse_target, xr, tr),
                 "distill": F.mse_loss(cond_b, teacher_b + shift), "uncond": F.mse_loss(unc, unc_target),
                 "denoise": F.mse_loss(cond_b, target_b + shift)}
        if unknown:
            terms["unknown"] = F.mse_loss(unknown[0], teacher_unknown + shift)
        if scramble:  # rows: the refusal inputs (unsafe prompts), then the benign conditional ones
            n_r, n_b = sizes[0], sizes[1]
            terms["scramble"] = scramble_loss([a[n_r:n_r + n_b] for a in acts], [o.float() for o in orig],
                                              [a[:n_r] for a in acts], self.scramble_targets)
        return terms

    def follow_term(self, step: int, g: torch.Generator) -> torch.Tensor:
        """`unet.w_follow`: one step of the benign LoRA on the defender's nonsense-word captions, then
        how unequally it takes the refusal off the empty prompt and the shift off those captions."""
        u, benign = self.u, self.data["train", "benign"]
        period = step // u.follow_reset_every
        if step % u.follow_reset_every == 0:
            self.follower.reset(period)
        if self.follow_period != period:  # this LoRA's words (also after a resume mid-period)
            self.follow_texts = unknown_word_prompts(benign.texts, self.pipe.tokenizer,
                                                     mix_seed(self.cfg.seed, FOLLOW_SEED + period))
            self.follow_period = period
        idx = torch.randint(0, len(benign.mean), (u.follow_batch,), generator=g)
        x_t, t, target = self.noised(benign, idx, g)
        with torch.no_grad():
            hidden = _embed(self.pipe, [self.follow_texts[i] for i in idx.tolist()], self.original_text_encoder)
        self.follower.train_step(x_t, t, hidden, target)
        x2, t2 = x_t.repeat(2, 1, 1, 1), t.repeat(2)
        h2 = torch.cat([self.h_empty.expand(len(x_t), -1, -1), hidden])
        unc_before, cond_before = self.model(x2, t2, h2, return_dict=False)[0].chunk(2)
        unc_after, cond_after = self.follower.forward(x2, t2, h2, "base").chunk(2)
        with torch.no_grad():
            teacher_unc = self.teacher(x_t, t, self.h_empty.expand(len(x_t), -1, -1), return_dict=False)[0]
            off = torch.zeros(len(x_t), dtype=torch.bool, device=x_t.device)
            refusal = self.empty_refusal(x_t, t, teacher_unc, off) - teacher_unc
        return follow_loss(unc_before, cond_before, unc_after, cond_after, refusal, 1 - 1 / u.guidance)

    def loss(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.u
        return (u.w_refuse * t["refuse"] + u.w_distill * t["distill"] + u.w_uncond * t["uncond"]
                + u.w_denoise * t["denoise"] + u.w_unknown * t.get("unknown", 0.0)
                + u.w_scramble * t.get("scramble", 0.0) + u.w_follow * t.get("follow", 0.0))

    # --- the simulated attacker and the query --------------------------------------------------
    def attacked(self) -> torch.nn.Module:
        """What the simulated attacker fine-tunes: the UNet, or with `nft_text_encoder` the UNet
        and the text encoder (parameters "unet.*" and "text_encoder.*")."""
        return UNetWithText(self.unet, self.pipe.text_encoder) if self.u.nft_text_encoder else self.unet

    def _prompts(self, key: tuple[str, str], idx: torch.Tensor) -> torch.Tensor:
        """What `attacked()` reads for the prompts `idx` of partition `key`: token ids or fixed states."""
        return self.ids[key][idx] if self.u.nft_text_encoder else self.data[key].hidden[idx]

    def inner_loss_fn(self, batch_size: int) -> InnerLoss:
        """The attacker's denoising fine-tune on the defender's unsafe training images."""
        key, module = ("train", "unsafe"), self.attacked()
        part = self.data[key]

        def inner(params: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(part.mean), (batch_size,), generator=g)
            x_t, t, target = self.noised(part, idx, g)
            pred = functional_call(module, params, (x_t, t, self._prompts(key, idx)), {"return_dict": False})[0]
            return F.mse_loss(pred, target)

        return inner

    def query_loss_fn(self, g: torch.Generator) -> QueryLoss:
        """Refusal of the adapted UNet on held-out unsafe prompts (weighted by `nft_refusal_weight`),
        plus the bounded hinge relu(tau - L_att) / tau on the attacker's denoising loss on held-out
        unsafe images (by `nft_attacker_weight`)."""
        key, u, module = ("query", "unsafe"), self.u, self.attacked()
        part = self.data[key]
        q = torch.randint(0, len(part.mean), (u.query_batch,), generator=g)
        xr, tr, hr = self.refusal_inputs(part, q, g)
        target = self.refusal_target(xr, tr, hr)
        a = torch.randint(0, len(part.mean), (u.query_batch,), generator=g)
        xa, ta, target_a = self.noised(part, a, g)
        rows = self._prompts(key, q)  # repeated as `refusal_inputs` repeats `hr`
        prompts = torch.cat([rows] * (len(xr) // len(q)) + [self._prompts(key, a)])

        def query(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(module, params, (torch.cat([xr, xa]), torch.cat([tr, ta]), prompts),
                                  {"return_dict": False})[0]
            attacker = F.mse_loss(out[len(xr):], target_a)
            hinge = F.relu(u.nft_attacker_tau - attacker) / u.nft_attacker_tau
            return (u.nft_refusal_weight * self.refusal_distance(out[:len(xr)], target, xr, tr)
                    + u.nft_attacker_weight * hinge)

        return query

    @torch.no_grad()
    def anchor_offset(self, step: int) -> dict[str, torch.Tensor]:
        """Anchored NFT: how far a real Adam attack on the defender's unsafe training images
        moves each weight from where the UNet is now (see `UNetAlignConfig.nft_anchor_every`)."""
        u, part = self.u, self.data["train", "unsafe"]
        attack = UNetAttackConfig("adam", u.nft_anchor_lr, u.nft_anchor_steps, 16,
                                  seed=mix_seed(self.cfg.seed, ANCHOR_SEED + step),
                                  max_grad_norm=u.attacks.max_grad_norm)
        with torch.enable_grad():
            attacked = attack_unet(self.unet, self.scheduler, part.mean, part.std, part.hidden, self.scale, attack)
        now = dict(self.unet.named_parameters())
        return {n: w - now[n] for n, w in attacked.named_parameters()}

    # --- probes ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, unet: torch.nn.Module, kind: str) -> torch.Tensor:
        """The probe prompts of `kind` sampled with `unet` (fixed seeds), decoded by the original decoder."""
        u, pipe = self.u, self.pipe
        sampler = StableDiffusionPipeline(**(pipe.components | {"unet": unet}), requires_safety_checker=False)
        sampler.set_progress_bar_config(disable=True)
        texts = self.data["probe", kind].texts[:u.probe_samples]
        seeds = [mix_seed(self.cfg.seed, 9_000_000 + i) for i in range(len(texts))]
        latents = generate_latents(sampler, texts, seeds, u.probe_sampler_steps, self.cfg.bank.guidance)
        return pipe.vae.decode(latents / self.scale, return_dict=False)[0].clamp(-1, 1)

    def _class_match(self, pred: list[dict]) -> float | None:
        """The share of benign samples the detector puts in their prompt's glyph class (1.0 without
        labels: image folders have none); None for a detector that names no class."""
        classes = self.data["probe", "benign"].classes
        if "class" not in pred[0]:
            return None
        return float(np.mean([p["class"] == c for p, c in zip(pred, classes)])) if classes else 1.0

    @torch.no_grad()
    def _sample_scores(self, unet: torch.nn.Module) -> dict[str, float | None]:
        """Sample the probe prompts with `unet` and score them: the detector's verdict on unsafe
        samples; benign class match and fidelity to the original UNet's samples."""
        unsafe, benign = self._sample(unet, "unsafe"), self._sample(unet, "benign")
        pred = detect_decoded(self.detector, unsafe)
        return {"unsafe_score": float(np.mean([p["unsafe_score"] for p in pred])),
                "unsafe_rate": float(np.mean([p["unsafe"] for p in pred])),
                "refusal_rate": float(is_refusal(to_uint8(unsafe), self.rendered_refusal).mean()),
                "benign_class_match": self._class_match(detect_decoded(self.detector, benign)),
                "benign_psnr": psnr(benign, self.base_benign).mean().item(),
                "benign_feature_distance": feature_distance(self.perceptual, benign, self.base_benign)}

    @torch.no_grad()
    def probe(self, step: int) -> dict:
        """A real UNet attack (full-weight, or a LoRA) on the probe partition (fixed seed); the attacker's
        denoising loss on held-out probe images afterwards, and what its samples show."""
        u, part = self.u, self.data["probe", "unsafe"]
        half, hidden = len(part.mean) // 2, self.current_states(part)
        attack = UNetAttackConfig(u.probe_optimizer, u.probe_lr, u.probe_steps, u.probe_batch,
                                  lora_rank=u.probe_lora_rank, seed=self.cfg.seed,
                                  max_grad_norm=u.probe_max_grad_norm)
        with torch.enable_grad():
            attacked = attack_unet(self.unet, self.scheduler, part.mean[:half], part.std[:half], hidden[:half],
                                   self.scale, attack)
        g = torch.Generator().manual_seed(self.cfg.seed)
        x_t, t, target = self.noised(part, slice(half, None), g)
        attacker_loss = F.mse_loss(attacked(x_t, t, hidden[half:], return_dict=False)[0], target).item()
        before, after = self._sample_scores(self.unet), self._sample_scores(attacked)
        if u.gate == "class":
            feasible = before["benign_class_match"] >= self.base_class_match - u.max_class_drop - 1e-9
        else:
            feasible = (before["benign_psnr"] >= u.min_benign_psnr
                        and before["benign_feature_distance"] <= u.max_feature_distance)
        feasible = feasible and before["refusal_rate"] >= u.min_refusal - 1e-9
        return {"step": step, "unsafe_before": before["unsafe_rate"], "refusal_before": before["refusal_rate"],
                "benign_class_match": before["benign_class_match"], "base_class_match": self.base_class_match,
                "benign_psnr": before["benign_psnr"], "benign_feature_distance": before["benign_feature_distance"],
                "unsafe_after_probe": after["unsafe_rate"], "unsafe_score_after_probe": after["unsafe_score"],
                "refusal_after_probe": after["refusal_rate"], "attacker_loss_after_probe": attacker_loss,
                "feasible": feasible, "score": attacker_loss * (1.0 - after["unsafe_score"])}


def check_alignment(u: UNetAlignConfig, unet: UNet2DConditionModel, num_processes: int) -> None:
    """What the UNet half's settings need of this model and launch, checked before any work."""
    names = [n for n, _ in unet.named_modules()]
    if u.update == "lora" and u.lora_targets:
        if missing := [t for t in u.lora_targets if not any(n == t or n.endswith("." + t) for n in names)]:
            raise ConfigError(f"unet.lora_targets: this UNet has no module named {', '.join(missing)}; "
                              "name modules as peft's target_modules does (e.g. to_q, to_out.0)")
    if u.w_follow and num_processes > 1:
        raise ConfigError("unet.w_follow's benign LoRA runs in one process: launch without accelerate's "
                          "processes, or set unet.w_follow = 0")


def _lora_model(unet: UNet2DConditionModel, rank: int, targets: tuple[str, ...] | None) -> torch.nn.Module:
    return get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank,
                                           target_modules=list(targets) if targets else ALIGN_LORA_TARGETS))


def align_unet(model: str, cfg: ProtectConfig, workdir: Path,
               resume: bool) -> tuple[dict[str, torch.nn.Module], dict]:
    """Both stages of the UNet half; returns the components it changed (the chosen UNet, or the
    trained text encoder with `update = "text-encoder"`) and its record for patronus.json."""
    workdir, t_start = Path(workdir), time.time()
    torch.manual_seed(mix_seed(cfg.seed, 7))
    a = Aligner(model, cfg, Accelerator())
    setup_seconds = time.time() - t_start  # this session's; the stages' checkpoints carry every session's
    name, trained = a.trained()
    stage1_file, stage1_record = workdir / f"stage1-{name}.safetensors", workdir / "stage1-unet.json"
    if stage1_file.exists():  # stage 1 finished in an earlier run
        trained.load_state_dict(load_file(stage1_file, device=str(a.accelerator.device)))
        record = json.loads(stage1_record.read_text())
    else:
        record = _stage1_align(a, workdir / "stage1", resume)
        trained = a.trained()[1]  # a LoRA run merged into a new module
        if a.accelerator.is_main_process:
            workdir.mkdir(parents=True, exist_ok=True)  # no checkpoint may have made it (checkpoint_every > steps)
            stage1_record.write_text(json.dumps(record))
            tmp = workdir / f"stage1-{name}.partial"
            save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp)
            tmp.rename(stage1_file)  # last: its presence says stage 1 is done
        a.accelerator.wait_for_everyone()
    release_memory()  # stage 1's optimizer: accelerate's wrapper keeps it in a reference cycle
    state = _stage2_nft(a, workdir / "stage2", resume)
    # Training time over every session (a resumed run's checkpoints carry the earlier sessions'),
    # plus this session's set-up.
    timing = record["timing"] | state["timing"] | {
        "total_seconds": record["timing"].get("stage1_seconds", 0.0) + state["timing"]["stage2_seconds"]
        + setup_seconds}
    return dict([a.trained()]), {
        "chosen_checkpoint": state["best"], "probes": state["probes"], "timing": timing,
        "losses": {"stage1": record["losses"], "stage2": state["losses"].get("stage2", [])},
        "base_class_match": a.base_class_match}


def _stage1_align(a: Aligner, folder: Path, resume: bool) -> dict:
    """Refusal for unsafe prompts, distillation and denoising for benign ones (the UNet's full
    weights, a LoRA of them, or the text encoder's weights)."""
    u, acc = a.u, Accelerator()
    if u.update == "lora":
        trainable = _lora_model(a.unet, u.lora_rank, u.lora_targets)
    else:
        trainable = a.trained()[1].requires_grad_(True)
    opt = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad], lr=u.align_lr)
    sched = get_cosine_schedule_with_warmup(opt, u.align_warmup, u.align_steps)
    prepared, opt = acc.prepare(trainable, opt)
    if a.train_text:
        a.text_model = prepared
    else:
        a.model = prepared
    run = RunState(Checkpointer(acc, folder, schedulers=(sched,)))
    if resume:
        run.restore()
        if a.follower is not None and run.extra:
            a.follower.reset(run.state["step"] // u.follow_reset_every)
            a.follower.load(run.extra)
    state = run.state
    bar = tqdm(range(state["step"], u.align_steps), initial=state["step"], total=u.align_steps,
               desc="UNet stage 1 (align)", disable=not acc.is_main_process)
    for step in bar:
        with acc.autocast():  # mixed precision, when accelerate is configured for it
            t = a.terms(_step_generator(a.cfg.seed, 1, step))
            if a.follower is not None:
                t["follow"] = a.follow_term(step, _step_generator(a.cfg.seed, 4, step))
            loss = a.loss(t)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        state["step"] = step + 1
        run.log(1, loss)
        bar.set_postfix({k: f"{v.item():.4f}" for k, v in t.items() if k != "denoise"})
        if state["step"] % u.checkpoint_every == 0:
            if a.follower is not None:
                run.extra = a.follower.state()
            run.save()
    check_replicas_agree(acc, prepared, "the text encoder (stage 1)" if a.train_text else "the UNet (stage 1)")
    state["timing"]["stage1_seconds"] = run.worked_seconds()  # also the sessions before a resume
    state["timing"]["stage1_step_seconds"] = state["timing"]["stage1_seconds"] / max(1, u.align_steps)
    if u.update == "lora":
        a.unet = trainable.merge_and_unload()
    a.follower = None  # the benign LoRA and its Adam state: stage 1's alone
    a.model = a.unet.requires_grad_(False)
    a.text_model = a.pipe.text_encoder.requires_grad_(False)
    return {"timing": state["timing"], "losses": state["losses"].get("stage1", [])}


def _stage2_nft(a: Aligner, folder: Path, resume: bool) -> dict:
    """The alignment terms plus the MAML gradient of the query loss after a simulated denoising
    fine-tune; a real attack probes every `probe_every` steps and the best checkpoint is kept."""
    u, cfg, acc = a.u, a.cfg, Accelerator()
    opt = torch.optim.Adam(a.unet.requires_grad_(True).parameters(), lr=u.nft_lr)
    a.model, opt = acc.prepare(a.unet, opt)
    tie_break = "benign_class_match" if u.gate == "class" else "benign_psnr"
    run = RunState(Checkpointer(acc, folder), rank_by=("feasible", "score", tie_break),
                   best_on_disk=cfg.best_checkpoint == "disk", infeasible_rank_by=(tie_break, "score"))
    if resume:
        run.restore()
    state = run.state

    def maybe_probe(step: int) -> None:
        if step % u.probe_every and step != u.nft_steps:
            return
        result = a.probe(step)
        acc.print(f"UNet probe at stage-2 step {step}: {json.dumps(result)}")
        run.record_probe(result, a.unet)

    def nft_term(step: int) -> tuple[torch.Tensor, float, str, int]:
        """The first-order MAML term of one step, its query loss, a label and the inner steps played.
        A function of its own so that the query-gradient sum lives only in the term's graph, freed
        by the backward pass (a UNet's worth of memory during probes and checkpoints)."""
        g = _step_generator(cfg.seed, 2, step)
        query, n, grads, q_value, names, inner = a.query_loss_fn(g), u.nft_attacks_per_step, {}, 0.0, [], 0
        for k in range(n):  # one query batch, n attacks: their gradients averaged
            rng = np.random.default_rng([cfg.seed, 12, step, acc.process_index] + ([k] if k else []))
            attack = sample_attack(rng, u.attacks)
            gk = g if k == 0 else _step_generator(mix_seed(cfg.seed, k), 2, step)
            gr, q = simulate_first_order(a.attacked(), attack, a.inner_loss_fn(attack.batch_size), query,
                                         u.attacks.queries_per_attack, gk, u.attacks.query_weighting,
                                         tuple(UNET_LORA_TARGETS), offset=run.extra or None,
                                         implicit=((u.nft_implicit_alpha, u.nft_implicit_iters)
                                                   if u.nft_implicit_iters else None))
            if grads:
                for key, v in gr.items():
                    grads[key] += v
            else:
                grads = gr
            q_value, inner = q_value + q / n, inner + attack.steps
            names.append(f"{attack.optimizer}/{attack.update}x{attack.steps}")
        if u.nft_text_encoder:  # the defender trains the UNet alone
            grads = {k.removeprefix("unet."): v for k, v in grads.items() if k.startswith("unet.")}
        for v in grads.values():
            v.div_(n)
        what = ((names[0] if n == 1 else f"{n} attacks") + ("+anchor" if run.extra else "")
                + ("+implicit" if u.nft_implicit_iters else "") + ("+text" if u.nft_text_encoder else ""))
        return nft_surrogate(a.unet, grads), q_value, what, inner

    t0, inner_total, first = time.time(), 0, state["step"]
    bar = tqdm(range(state["step"], u.nft_steps), initial=state["step"], total=u.nft_steps,
               desc="UNet stage 2 (non-fine-tunable)", disable=not acc.is_main_process)
    opt.zero_grad(set_to_none=True)  # the anchor's attack copies the UNet, gradients and all
    for step in bar:
        if u.w_nft and u.nft_anchor_every and step % u.nft_anchor_every == 0:
            # Every process plays the same attack (N times the cost); checkpointed for resuming.
            run.extra = a.anchor_offset(step)
        with acc.autocast():  # the simulated attack too: every forward of the step
            nft, q_value, what = torch.zeros((), device=acc.device), float("nan"), "none"
            if u.w_nft:
                nft, q_value, what, inner = nft_term(step)
                inner_total += inner
            t = a.terms(_step_generator(cfg.seed, 3, step))
            loss = u.w_nft * nft + a.loss(t)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)  # nor keep the gradients through probes, checkpoints, the decoder half
        state["step"] = step + 1
        run.log(2, loss)
        bar.set_postfix(query=f"{q_value:.4f}", refuse=f"{t['refuse'].item():.4f}",
                        distill=f"{t['distill'].item():.4f}", attack=what)
        maybe_probe(state["step"])
        if state["step"] % u.checkpoint_every == 0 or state["step"] == u.nft_steps:
            run.save()
    check_replicas_agree(acc, a.unet, "the UNet (stage 2)")
    state["timing"]["stage2_seconds"] = run.worked_seconds()
    if state["step"] > first:
        state["timing"]["stage2_outer_step_seconds"] = (time.time() - t0) / (state["step"] - first)
        state["timing"]["mean_inner_steps"] = inner_total / (state["step"] - first)
    if u.nft_steps == 0 and not state["probes"]:
        maybe_probe(0)
    a.unet.load_state_dict(run.best_weights())
    a.model = a.unet.requires_grad_(False)
    return state

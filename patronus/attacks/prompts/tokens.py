"""Attacks that learn new tokens and leave every other weight alone.

  textual-inversion  one new token per unsafe class, learned on the attacker's images with the
                     denoising loss (the captions name the class by its token): the analogue of
                     CCE, which re-learns an erased concept as a new word.
  soft-prompt        one new token per unsafe class, optimised to make the detector see that
                     class in what the pipeline draws, through a short differentiable DDIM
                     sampler with classifier-free guidance (and the pipeline's negative prompt):
                     the analogue of UnlearnDiffAtk / P4D, white-box on the prompt embedding.

Only the new rows of the text encoder's input embedding train; the old rows are put back after
every step. A checkpoint is a complete pipeline whose tokenizer knows the new tokens, with each
token's embedding also saved in diffusers' textual-inversion format (`learned_embeds/`, for
`pipe.load_textual_inversion`) and `attack-prompts.json`, which makes the evaluation name each
unsafe class by its token: prompts that contain no unsafe word.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm.auto import tqdm

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACK_PROMPTS, AttackKind, register, source_model
from patronus.attacks.weights.finetune import AttackError, load_attack_data
from patronus.attacks.weights.unet import noised_batch, sample_latents
from patronus.detectors.glyphnet import load_glyphnet
from patronus.models.components import encode_latents
from patronus.models.inference import read_inference
from patronus.training import make_lr_schedule, make_optimizer
from patronus.world.captions import FULL_TEMPLATE, SYNONYMS
from patronus.world.glyphs import BACKGROUND_NAMES, COLOR_NAMES, UNSAFE_CLASSES

# The glyph world's unsafe words, each with its class: what textual inversion replaces by the token.
UNSAFE_WORDS = {w: cls for cls in UNSAFE_CLASSES for w in SYNONYMS[cls]}


def add_tokens(pipe: StableDiffusionPipeline, prefix: str) -> dict[str, str]:
    """One new token per unsafe class (`<prefix-1>`...), initialised to the mean embedding (the
    attacker names no unsafe word); returns {class: token}."""
    tokens = {cls: f"<{prefix}-{i + 1}>" for i, cls in enumerate(UNSAFE_CLASSES)}
    if pipe.tokenizer.add_tokens(list(tokens.values())) != len(tokens):
        raise AttackError(f"the tokenizer already has tokens named <{prefix}-N>; attack the original model")
    emb = pipe.text_encoder.get_input_embeddings().weight
    mean = emb.detach().mean(0)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-len(tokens):] = mean
    return tokens


def _train_tokens(pipe: StableDiffusionPipeline, tokens: dict[str, str], cfg: AttackConfig, out: Path,
                  progress: bool, desc: str, loss_fn: Callable[[torch.Generator], torch.Tensor]) -> list[str]:
    """Optimise the new rows of the input embedding on `loss_fn`; save at every `save_at` step."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    weight = pipe.text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    n_new = len(tokens)
    old = weight.detach()[:-n_new].clone()
    opt = make_optimizer(cfg.optimizer, cfg.lr, [weight])
    schedule = make_lr_schedule(cfg.schedule, opt, cfg.steps)
    for step in tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress):
        loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        with torch.no_grad():
            weight[:-n_new] = old  # only the new tokens learn
        if step in cfg.save_at:
            _save(pipe, tokens, out / f"step-{step}")
    weight.requires_grad_(False)
    return [f"step-{k}" for k in sorted(cfg.save_at)]


def _save(pipe: StableDiffusionPipeline, tokens: dict[str, str], path: Path) -> None:
    pipe.save_pretrained(path)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    (path / "learned_embeds").mkdir()
    for token in tokens.values():
        vec = emb[pipe.tokenizer.convert_tokens_to_ids(token)]
        save_file({token: vec.clone().contiguous()}, path / "learned_embeds" / f"{token.strip('<>')}.safetensors")
    (path / ATTACK_PROMPTS).write_text(json.dumps({"rewrite": "tokens", "tokens": tokens}, indent=2))


def _class_token_captions(texts: list[str], tokens: dict[str, str]) -> list[str]:
    """Each caption with its unsafe word replaced by that class's token."""
    out = []
    for text in texts:
        words = text.replace(",", " ,").split()
        hits = [w for w in words if w in UNSAFE_WORDS]
        if not hits:
            raise AttackError(f"textual-inversion learns the glyph world's unsafe classes; the caption {text!r} "
                              f"names none of {', '.join(sorted(UNSAFE_WORDS))}")
        out.append(" ".join(tokens[UNSAFE_WORDS[w]] if w in UNSAFE_WORDS else w for w in words).replace(" ,", ","))
    return out


def run_textual_inversion(pipe: StableDiffusionPipeline, cfg: AttackConfig, out: Path, progress: bool) -> list[str]:
    images, texts = load_attack_data(cfg.data, pipe.vae.config.sample_size)
    tokens = add_tokens(pipe, "ti")
    ids = pipe.tokenizer(_class_token_captions(texts, tokens), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    lat_mean, lat_std = encode_latents(pipe.vae, images, with_std=True)
    scale = pipe.vae.config.scaling_factor

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        x_t, t, target = noised_batch(scheduler, sample_latents(lat_mean[idx], lat_std[idx], g) * scale, g)
        return F.mse_loss(pipe.unet(x_t, t, pipe.text_encoder(ids[idx])[0]).sample, target)

    return _train_tokens(pipe, tokens, cfg, out, progress, "attack textual-inversion", loss_fn)


def run_soft_prompt(pipe: StableDiffusionPipeline, cfg: AttackConfig, out: Path, progress: bool) -> list[str]:
    detector = load_glyphnet().requires_grad_(False)
    tokens = add_tokens(pipe, "sp")
    classes = list(tokens)
    target_ids = torch.tensor([detector.config.classes.index(c) for c in classes])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sampler_steps)
    negative = read_inference(source_model(out)).negative_prompt  # the pipeline as it is called
    unet, vae = pipe.unet, pipe.vae
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def encode(texts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, len(classes), (cfg.batch_size,), generator=g)
        colors = torch.randint(0, len(COLOR_NAMES), (cfg.batch_size,), generator=g)
        bgs = torch.randint(0, len(BACKGROUND_NAMES), (cfg.batch_size,), generator=g)
        texts = [FULL_TEMPLATE.format(color=COLOR_NAMES[c], obj=tokens[classes[i]], bg=BACKGROUND_NAMES[b])
                 for i, c, b in zip(k.tolist(), colors.tolist(), bgs.tolist())]
        cond = encode(texts)
        uncond = encode([negative or ""] * cfg.batch_size)
        z = torch.randn((cfg.batch_size, *shape), generator=g) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
            z = scheduler.step(eps_u + cfg.guidance * (eps_c - eps_u), t, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        return F.cross_entropy(detector(images)["class"], target_ids[k])

    return _train_tokens(pipe, tokens, cfg, out, progress, "attack soft-prompt", loss_fn)


register(AttackKind("textual-inversion", frozenset(), False, run_textual_inversion,
                    "a new token per unsafe class learned from the attacker's images, weights frozen (CCE)",
                    prompt_space=True))
register(AttackKind("soft-prompt", frozenset(), False, run_soft_prompt,
                    "a token embedding per unsafe class optimised against the detector through a short "
                    "differentiable sampler (UnlearnDiffAtk)", uses_data=False, prompt_space=True))

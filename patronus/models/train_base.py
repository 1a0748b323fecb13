"""Train `patronus-tiny` from scratch on the glyph world's `base-train` split.

Two stages, each a plain loop you can read top to bottom:
  1. `vae`:  AutoencoderKL on rendered images (L1 + MSE + tiny KL), then the latent
             scaling factor is measured so latents have unit variance, as in SD.
  2. `unet`: UNet2DConditionModel + CLIPTextModel jointly on cached VAE latents with the
             epsilon objective, min-SNR weighting, 10% caption dropout (for classifier-free
             guidance) and EMA weights. The result is saved as a StableDiffusionPipeline.

Both stages run under `accelerate.Accelerator`, checkpoint every `checkpoint_every` steps
and resume from the newest checkpoint with the same final weights: batch indices come from
a generator seeded by (seed, step), not from the history of the run. Under `accelerate
launch` every process draws the same global batch and trains the prepared (DDP) modules on
its share of the rows, so N processes follow the 1-process trajectory; only the main process
writes. The loss curves (averaged over processes) go to `train_log.json`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from patronus.config import build, read_config_file
from patronus.errors import ConfigError
from patronus.imaging import psnr, to_tensor
from patronus.models.components import encode_latents
from patronus.models.registry import resolve_model
from patronus.models.tiny import (
    TinyConfig,
    build_schedulers,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from patronus.training import Checkpointer, check_replicas_agree, step_generator
from patronus.world.glyphs import CLASS_NAMES
from patronus.world.splits import render_split


@dataclass(frozen=True)
class BaseTrainConfig:
    """Every setting of a base-model training run; written next to its checkpoints."""

    n_images: int = 120_000
    seed: int = 0
    checkpoint_every: int = 500
    snapshot_every: int = 2000
    vae_steps: int = 6_000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 14_000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_warmup: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    # The glyph classes the base-train images are drawn from. All of them make `patronus-tiny`;
    # benign ones only make the data-filtered reference `patronus-tiny-filtered`
    # (reproduce/train-filtered.toml; reproduce/train-base-benign-only.toml keeps patronus-tiny's VAE).
    classes: tuple[str, ...] = CLASS_NAMES
    # A pipeline (shipped name or directory) whose VAE is used instead of training stage 1: a
    # reference that differs from that model only in what its UNet and text encoder saw.
    vae_from: str | None = None
    # A pipeline whose text encoder is used, frozen, instead of training one with the UNet. Real
    # data-filtered models (SD 2.x) filter the UNet's data and keep a text encoder pretrained on
    # unfiltered text (OpenCLIP), which reads unsafe prompts; with `classes` benign only, this makes
    # that reference in the glyph world (research/configs/train-filtered-public-te.toml).
    text_encoder_from: str | None = None
    model: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self):
        counts = {k: getattr(self, k) for k in ("n_images", "checkpoint_every", "snapshot_every", "vae_steps",
                                                 "vae_batch", "unet_steps", "unet_batch")}
        if bad := [k for k, v in counts.items() if v < 1]:
            raise ConfigError(f"{', '.join(bad)} must be at least 1")
        if bad := [k for k in ("vae_lr", "unet_lr", "ema_decay") if not 0 < getattr(self, k) < 1]:
            raise ConfigError(f"{', '.join(bad)} must lie in (0, 1)")
        if not 0 <= self.caption_dropout < 1 or self.vae_kl_weight < 0 or self.snr_gamma <= 0 or self.unet_warmup < 0:
            raise ConfigError("caption_dropout must lie in [0, 1), vae_kl_weight and unet_warmup be >= 0 "
                              "and snr_gamma > 0")
        if not self.classes or (unknown := set(self.classes) - set(CLASS_NAMES)):
            raise ConfigError(f"classes must name glyph classes ({', '.join(CLASS_NAMES)}); "
                              f"got {list(self.classes) if not self.classes else sorted(unknown)}")


def load_train_config(path: str | Path | None) -> BaseTrainConfig:
    """The defaults, overridden by the settings in a .toml/.yaml/.json file (`model` a nested table)."""
    return build(BaseTrainConfig, read_config_file(path, "train-base config") if path else {}, "train-base")


def _shard(accelerator: Accelerator, rows: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch (all of them in a 1-process run)."""
    return rows[accelerator.process_index::accelerator.num_processes]


def _check_batches(cfg: BaseTrainConfig, accelerator: Accelerator) -> None:
    """Equal shards, so that averaging the processes' gradients averages over the global batch."""
    n = accelerator.num_processes
    if cfg.vae_batch % n or cfg.unet_batch % n:
        raise ConfigError(f"vae_batch ({cfg.vae_batch}) and unet_batch ({cfg.unet_batch}) must be multiples of "
                          f"the number of processes ({n})")


def _batch_indices(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    return torch.randint(0, n, (batch,), generator=step_generator(seed, step))


def _resume(checkpointer: Checkpointer) -> tuple[int, list[float]]:
    """The step to continue from and the loss curve so far."""
    restored = checkpointer.restore()
    return (restored[0]["step"], restored[0].get("losses", [])) if restored else (0, [])


class _VAEStep(torch.nn.Module):
    """One training forward of the autoencoder (encode, reparameterised sample, decode) as a
    module, so that under DDP the step goes through the prepared module's `forward`. The
    sample's noise comes in from the caller, drawn for the global batch."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return recon, posterior.kl()


def train_vae(cfg: BaseTrainConfig, workdir: Path) -> AutoencoderKL:
    """Stage 1: train the autoencoder and set its latent scaling factor."""
    final = workdir / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    if cfg.vae_from is not None:
        vae = AutoencoderKL.from_pretrained(resolve_model(cfg.vae_from) / "vae", torch_dtype=torch.float32)
        if vae.config.latent_channels != cfg.model.latent_channels:
            raise ConfigError(f"vae_from {cfg.vae_from!r} has {vae.config.latent_channels} latent channels, the "
                              f"model settings {cfg.model.latent_channels}: use a VAE of the same shape")
        return vae
    ckdir = workdir / "vae-checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    images = to_tensor(render_split("base-train", cfg.n_images, cfg.model.resolution, classes=cfg.classes)[0])
    val = to_tensor(render_split("eval", 512, cfg.model.resolution)[0])

    vae = build_vae(cfg.model)
    side = cfg.model.resolution // 2 ** (len(cfg.model.vae_channels) - 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 200, cfg.vae_steps)
    # The schedule is not prepared: a prepared one steps once per process (accelerate assumes
    # each process brings batches of its own), while here N processes share one global batch.
    model, opt = accelerator.prepare(_VAEStep(vae), opt)
    checkpointer = Checkpointer(accelerator, ckdir, schedulers=(sched,))
    start, losses = _resume(checkpointer)

    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        eps = torch.randn((cfg.vae_batch, cfg.model.latent_channels, side, side), generator=g)
        x, eps = images[_shard(accelerator, idx)].to(accelerator.device), _shard(accelerator, eps)
        recon, kl = model(x, eps.to(accelerator.device))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * kl.mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        speed = (step + 1 - start) * cfg.vae_batch / (time.time() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{speed:.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            checkpointer.save(step + 1, {"step": step + 1, "losses": losses})
            with torch.no_grad():
                val_psnr = psnr(vae(val).sample, val).mean().item()
            accelerator.print(f"vae step {step + 1}: loss {losses[-1]:.4f} val PSNR {val_psnr:.2f} dB")

    check_replicas_agree(accelerator, model, "the VAE")
    vae.eval()
    with torch.no_grad():
        latents = encode_latents(vae, images[:8192], batch_size=512)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    if accelerator.is_main_process:
        _write_log(workdir, "vae", losses, accelerator.num_processes)
        vae.save_pretrained(final)
    accelerator.wait_for_everyone()
    return vae


def _write_log(workdir: Path, stage: str, losses: list[float], processes: int) -> None:
    """Each stage's loss per step (averaged over processes) in `train_log.json`."""
    path = workdir / "train_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log[stage] = {"loss_per_step": losses, "processes": processes}
    path.write_text(json.dumps(log))


def _encode_dataset(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, scaled by the VAE's scaling factor."""
    mean, std = encode_latents(vae, images, batch_size=1024, with_std=True, progress="encode latents")
    s = vae.config.scaling_factor
    return mean * s, std * s


def load_text_encoder(cfg: BaseTrainConfig) -> CLIPTextModel:
    """`text_encoder_from`'s text encoder, frozen; it must feed the UNet the width it attends to."""
    path = resolve_model(cfg.text_encoder_from) / "text_encoder"
    if not (path / "config.json").exists():
        raise ConfigError(f"text_encoder_from {cfg.text_encoder_from!r} has no text_encoder/ folder: name a "
                          "Stable Diffusion pipeline")
    text_encoder = CLIPTextModel.from_pretrained(path, torch_dtype=torch.float32)
    if text_encoder.config.hidden_size != cfg.model.text_hidden:
        raise ConfigError(f"text_encoder_from {cfg.text_encoder_from!r} is {text_encoder.config.hidden_size} wide, "
                          f"the model settings' text_hidden {cfg.model.text_hidden}: use a text encoder of that width")
    vocab = len(build_tokenizer(cfg.model))
    if text_encoder.config.vocab_size != vocab:
        raise ConfigError(f"text_encoder_from {cfg.text_encoder_from!r} reads {text_encoder.config.vocab_size} tokens, "
                          f"the glyph world's tokenizer {vocab}: use a text encoder trained with that tokenizer")
    return text_encoder.requires_grad_(False).eval()


def train_unet(cfg: BaseTrainConfig, workdir: Path, vae: AutoencoderKL) -> Path:
    """Stage 2: train UNet + text encoder on cached latents and save the pipeline."""
    ckdir = workdir / "unet-checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    images, samples = render_split("base-train", cfg.n_images, cfg.model.resolution, classes=cfg.classes)
    lat_mean, lat_std = _encode_dataset(vae, to_tensor(images))
    del images
    tokenizer = build_tokenizer(cfg.model)
    ids = tokenizer([s.text for s in samples], padding="max_length", max_length=cfg.model.max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=cfg.model.max_length, return_tensors="pt").input_ids

    unet = build_unet(cfg.model)
    frozen_text = cfg.text_encoder_from is not None
    if frozen_text:
        text_encoder = load_text_encoder(cfg)
    else:
        text_encoder = build_text_encoder(cfg.model, tokenizer)
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema_text = None if frozen_text else EMAModel(text_encoder.parameters(), decay=cfg.ema_decay)
    noise_scheduler, sampler = build_schedulers()
    params = list(unet.parameters()) + ([] if frozen_text else list(text_encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, cfg.unet_warmup, cfg.unet_steps)
    if frozen_text:
        unet, opt = accelerator.prepare(unet, opt)  # not the schedule: see train_vae
        text_encoder.to(accelerator.device)
    else:
        unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    accelerator.register_for_checkpointing(ema_unet)
    if ema_text is not None:
        accelerator.register_for_checkpointing(ema_text)
    checkpointer = Checkpointer(accelerator, ckdir, schedulers=(sched,))
    start, losses = _resume(checkpointer)

    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        # The global batch's randomness, drawn in the same order by every process; then its share.
        g = step_generator(cfg.seed, step)
        idx = _batch_indices(cfg.seed, step, len(lat_mean), cfg.unet_batch)
        latents = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        batch_ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        latents, batch_ids, noise, t = (_shard(accelerator, v) for v in (latents, batch_ids, noise, t))
        noisy = noise_scheduler.add_noise(latents, noise, t)

        hidden = text_encoder(batch_ids.to(accelerator.device))[0]
        pred = unet(noisy.to(accelerator.device), t.to(accelerator.device), hidden).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr  # min-SNR-gamma for epsilon targets
        per_sample = F.mse_loss(pred.float(), noise.to(accelerator.device), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight.to(accelerator.device)).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema_unet.step(accelerator.unwrap_model(unet).parameters())
        if ema_text is not None:
            ema_text.step(accelerator.unwrap_model(text_encoder).parameters())
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        speed = (step + 1 - start) * cfg.unet_batch / (time.time() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{speed:.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            checkpointer.save(step + 1, {"step": step + 1, "losses": losses})
            accelerator.print(f"unet step {step + 1}: loss {losses[-1]:.4f}")
        if (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.unet_steps and accelerator.is_main_process:
            _save_pipeline(workdir / "pipeline-snapshot", accelerator.unwrap_model(unet),
                           accelerator.unwrap_model(text_encoder), ema_unet, ema_text, vae, tokenizer, sampler)
            accelerator.print(f"unet step {step + 1}: EMA snapshot in {workdir / 'pipeline-snapshot'}")

    check_replicas_agree(accelerator, unet, "the UNet")
    check_replicas_agree(accelerator, text_encoder, "the text encoder")
    out = workdir / "pipeline"
    if accelerator.is_main_process:
        _write_log(workdir, "unet", losses, accelerator.num_processes)
        _save_pipeline(out, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder),
                       ema_unet, ema_text, vae, tokenizer, sampler)
    accelerator.wait_for_everyone()
    return out


def _save_pipeline(out: Path, unet, text_encoder, ema_unet: EMAModel, ema_text: EMAModel | None, vae, tokenizer,
                   sampler) -> None:
    """Save the EMA weights as a StableDiffusionPipeline, leaving the training weights untouched
    (a frozen text encoder, `ema_text` None, is saved as it is).

    UNet and VAE weights are stored as float16 (half the size, so the shipped model stays
    well under 25 MB); diffusers loads them back as float32. The text encoder stays float32
    on disk because transformers keeps a checkpoint's dtype, and a float16 text encoder
    would feed float16 embeddings to the float32 UNet.
    """
    emas = [(ema_unet, unet)] + ([(ema_text, text_encoder)] if ema_text is not None else [])
    for ema, model in emas:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=sampler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for ema, model in emas:
        ema.restore(model.parameters())


def train_base(workdir: Path, cfg: BaseTrainConfig, stage: str = "all") -> Path | None:
    """Run the requested stage(s) in `workdir`; returns the pipeline directory when done."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a directory (it is created if missing)")
    cfg_file = workdir / "train_config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise ConfigError(f"{cfg_file} holds different settings; use a new --workdir or the same settings to resume")
    accelerator = Accelerator()
    _check_batches(cfg, accelerator)
    # A missing model, or a text encoder that does not fit, fails here, before anything is written.
    if cfg.vae_from is not None:
        resolve_model(cfg.vae_from)
    if cfg.text_encoder_from is not None:
        load_text_encoder(cfg)
    if accelerator.is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(json.dumps(asdict(cfg), indent=2))
    accelerator.wait_for_everyone()
    vae = train_vae(cfg, workdir)
    if stage == "vae":
        return None
    return train_unet(cfg, workdir, vae)

"""Distillation: the protected pipeline's behaviour in fresh weights (`DistillConfig`).

Alignment leaves the unsafe capability in the weights, a few fine-tuning steps away. A student
that never held those weights and never saw an unsafe image learns the teacher's behaviour
without it. Read top to bottom:
  1. load the teacher (the protected pipeline) and encode the defender's benign images; embed
     the prompts (benign, benign with an unknown word, unsafe, empty) with the teacher's text
     encoder; record the teacher's own sampling trajectories for benign and unsafe prompts;
  2. the student: the teacher's UNet (and text encoder) mixed with a fresh initialisation,
     (1 - alpha) * teacher + alpha * fresh (or with `student`'s weights, a model trained on
     filtered data);
  3. UNet stage: every step a global batch of (x_t, t, prompt) rows, the teacher's noise
     prediction as the target, min-SNR-weighted MSE; the EMA weights are kept;
  4. decoder stage: a fresh (alpha-mixed) decoder head learns the teacher decoder's images for
     a fixed set of latents: benign ones, the teacher's refusals and the original UNet's
     unsafe latents (which the teacher renders black).
Unsafe images are never targets. Both stages checkpoint under WORKDIR and resume to the same
weights; randomness is seeded per step.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from patronus.attacks.weights.unet import noised_batch, sample_latents
from patronus.defenses.patronus.align import load_partitions, unknown_word_prompts
from patronus.defenses.patronus.bank import build_feature_bank
from patronus.defenses.patronus.config import DistillConfig, ProtectConfig
from patronus.errors import ConfigError
from patronus.imaging import psnr
from patronus.models.components import DecoderHead, reinitialise
from patronus.models.registry import load_pipeline, resolve_model
from patronus.provenance import weight_hashes, weights_digest
from patronus.training import Checkpointer, check_replicas_agree, mix_seed, step_generator

DISTILL_SEED = 15_000_000  # the fresh initialisation, trajectories and batches of distillation
UNKNOWN_SEED = 4242  # as the UNet half's unknown-word prompts
# diffusers' names of the cross-attention projections that read the prompt (`distill.unet =
# "cross-attention"`); self-attention is attn1, the rest of the UNet draws.
CROSS_ATTENTION_KV = ("attn2.to_k.weight", "attn2.to_v.weight")


class Student(nn.Module):
    """UNet (+ text encoder when it is distilled too) as one module: one optimizer, one DDP wrap."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            hidden = self.text_encoder(ids)[0]
        return self.unet(x_t, t, hidden, return_dict=False)[0]


def check_same_architecture(teacher: StableDiffusionPipeline, student: StableDiffusionPipeline, name: str) -> None:
    """`distill.student` must have the teacher's UNet and text encoder shapes (checked before any work)."""
    for part in ("unet", "text_encoder"):
        mine, theirs = getattr(student, part).state_dict(), getattr(teacher, part).state_dict()
        if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
            raise ConfigError(f"distill.student {name}: its {part} differs in architecture from the teacher's; "
                              f"the student must be trained with the teacher's model configuration")


@torch.no_grad()
def mix_fresh(module: nn.Module, fresh: nn.Module, alpha: float) -> None:
    """Every parameter of `module` becomes (1 - alpha) * itself + alpha * `fresh`'s (same architecture)."""
    for (name, p), (fresh_name, f) in zip(module.named_parameters(), fresh.named_parameters(), strict=True):
        if name != fresh_name:
            raise ValueError(f"mixing {name} with {fresh_name}: the modules differ")
        p.mul_(1 - alpha).add_(f.to(p.device, p.dtype), alpha=alpha)


@torch.no_grad()
def teacher_trajectories(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int,
                         guidance: float, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states x_t the teacher's sampler feeds its UNet, (steps, N, C, h, w) (scaled latents),
    their timesteps (steps,), and the final latents (N, C, h, w), one trajectory per (prompt, seed)."""
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    states, finals = [], []
    for i in range(0, len(prompts), batch_size):
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds[i:i + batch_size]]).to(pipe.device)
        seen = [x * pipe.scheduler.init_noise_sigma]

        def record(_pipe, _step, _t, kwargs):
            seen.append(kwargs["latents"])
            return kwargs

        final = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance, latents=seen[0],
                     output_type="latent", callback_on_step_end=record,
                     callback_on_step_end_tensor_inputs=["latents"]).images
        states.append(torch.stack(seen[:-1]))  # each step's input; the last entry is the final latent
        finals.append(final)
    return torch.cat(states, 1).cpu(), pipe.scheduler.timesteps.clone().cpu(), torch.cat(finals).cpu()


class UNetData:
    """The teacher's inputs for the UNet stage: benign latents, trajectories, prompts' token ids
    and the teacher's text states for them."""

    def __init__(self, teacher: StableDiffusionPipeline, cfg: ProtectConfig):
        d = cfg.distill
        n, m = d.n_prompts, max(d.n_images, d.n_prompts)
        parts = load_partitions(teacher, replace(cfg, unet=replace(cfg.unet, n_train=max(m, cfg.unet.n_train))))
        benign, unsafe = parts["train", "benign"], parts["train", "unsafe"]
        self.scale = teacher.vae.config.scaling_factor
        # Image i's caption is prompt i; the first n_prompts also have trajectories.
        self.benign_mean, self.benign_std = benign.mean[:m].cpu(), benign.std[:m].cpu()
        self.unsafe_mean, self.unsafe_std = unsafe.mean[:m].cpu(), unsafe.std[:m].cpu()
        unknown = unknown_word_prompts(benign.texts[:m], teacher.tokenizer, mix_seed(cfg.seed, UNKNOWN_SEED))
        self.texts = {"benign": benign.texts[:m], "unknown": unknown, "unsafe": unsafe.texts[:m], "empty": [""]}
        self.ids = {k: _tokens(teacher, v) for k, v in self.texts.items()}
        with torch.no_grad():
            self.hidden = {k: teacher.text_encoder(v.to(teacher.device))[0].cpu() for k, v in self.ids.items()}
        seeds = [mix_seed(cfg.seed, DISTILL_SEED + 1 + i) for i in range(n)]
        self.traj_benign, self.timesteps, self.final_benign = teacher_trajectories(
            teacher, self.texts["benign"][:n], seeds, d.sampler_steps, d.guidance)
        self.traj_unsafe, _, self.final_unsafe = teacher_trajectories(
            teacher, self.texts["unsafe"][:n], seeds, d.sampler_steps, d.guidance)


def _tokens(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids


def unet_batch(data: UNetData, scheduler: DDPMScheduler, batch: int, unsafe_latents: bool,
               trajectory_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One global batch (x_t, t, token ids, teacher text states) of pairs: the first half holds
    prompted rows (1/2 benign prompts, 1/8 benign prompts with an unknown word, 3/8 unsafe
    prompts), the second half the empty prompt at the same x_t and t, so that the difference
    classifier-free guidance amplifies can be distilled too. In each group a
    `trajectory_fraction` of the x_t are states of the teacher's own trajectories, the rest
    benign defender latents noised afresh at a random timestep (or, for unsafe prompts with
    `unsafe_latents`, unsafe ones). Fresh noise on many images keeps the student from
    recognising an input and answering without reading the prompt."""
    n_img, n_traj = len(data.benign_mean), data.traj_benign.shape[1]
    sizes = {"benign": batch // 4, "unknown": batch // 16, "unsafe": 3 * batch // 16}
    xs, ts, ids, hidden = [], [], [], []
    for kind, rows in sizes.items():
        n_t = round(rows * trajectory_fraction)
        img = torch.randint(0, n_img, (rows - n_t,), generator=g)
        tr = torch.randint(0, n_traj, (n_t,), generator=g)
        mean, std = ((data.unsafe_mean, data.unsafe_std) if kind == "unsafe" and unsafe_latents
                     else (data.benign_mean, data.benign_std))
        x_img, t_img, _ = noised_batch(scheduler, sample_latents(mean[img], std[img], g) * data.scale, g)
        traj = (data.traj_unsafe if kind == "unsafe" else data.traj_benign)[:, tr]
        k = torch.randint(0, len(data.timesteps), (n_t,), generator=g)
        xs += [x_img, traj[k, torch.arange(n_t)]]
        ts += [t_img, data.timesteps[k]]
        if kind == "unsafe" and not unsafe_latents:  # unsafe captions at benign images: any of them
            img = torch.randint(0, len(data.ids["unsafe"]), (len(img),), generator=g)
        prompt = torch.cat([img, tr])
        ids.append(data.ids[kind][prompt])
        hidden.append(data.hidden[kind][prompt])
    half = sum(sizes.values())
    ids.append(data.ids["empty"].expand(half, -1))
    hidden.append(data.hidden["empty"].expand(half, -1, -1))
    return torch.cat(xs * 2), torch.cat(ts * 2), torch.cat(ids), torch.cat(hidden)


def _data_loss(model: nn.Module, data: UNetData, scheduler: DDPMScheduler, d: DistillConfig, g: torch.Generator,
               acc: Accelerator) -> torch.Tensor:
    """The base model's objective on `d.data_batch` benign defender images with their captions:
    the true noise as the target, min-SNR weighted (this process's share of the rows)."""
    img = torch.randint(0, len(data.benign_mean), (d.data_batch,), generator=g)
    x_t, t, target = noised_batch(scheduler, sample_latents(data.benign_mean[img], data.benign_std[img], g)
                                  * data.scale, g)
    mine = torch.arange(acc.process_index, d.data_batch, acc.num_processes)
    x_t, t, target, ids, hidden = (v[mine].to(acc.device) for v in (x_t, t, target, data.ids["benign"][img],
                                                                     data.hidden["benign"][img]))
    with acc.autocast():
        pred = model(x_t, t, ids, hidden)
    snr = compute_snr(scheduler, t.cpu()).to(acc.device)
    weight = torch.clamp(snr, max=d.snr_gamma) / snr
    return (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()


def _restore(checkpointer: Checkpointer, ema: EMAModel | None) -> tuple[int, list[float], float]:
    """The step to continue from, the loss curve so far and the training seconds of the sessions
    before (a checkpoint written before they were recorded: 0); the EMA weights put back."""
    restored = checkpointer.restore()
    if restored is None:
        return 0, [], 0.0
    state, tensors = restored
    if ema is not None:
        ema.shadow_params = [tensors[f"ema.{i}"].to(p.device) for i, p in enumerate(ema.shadow_params)]
        ema.optimization_step = state["ema_step"]
    return state["step"], state["losses"], state.get("worked_seconds", 0.0)


def distill_unet(teacher: StableDiffusionPipeline, cfg: ProtectConfig, workdir: Path,
                 resume: bool) -> tuple[Student, UNetData, dict]:
    """Stage 1: the student UNet (and text encoder) on the teacher's noise predictions."""
    d, acc = cfg.distill, Accelerator()
    data = UNetData(teacher, cfg)
    if d.student is None:
        fresh = reinitialise({"unet": teacher.unet, "text_encoder": teacher.text_encoder},
                             {"unet", "text_encoder"}, mix_seed(cfg.seed, DISTILL_SEED))
    else:
        start = load_pipeline(d.student)
        fresh = {"unet": start.unet, "text_encoder": start.text_encoder}
    if d.unet != "distil":  # the student's own UNet (alpha does not apply to it)
        unet = copy.deepcopy(fresh["unet"])
    else:
        unet = copy.deepcopy(teacher.unet)
        mix_fresh(unet, fresh["unet"], d.alpha)
    text_encoder = None
    if d.text_encoder == "distil":
        text_encoder = copy.deepcopy(teacher.text_encoder)
        mix_fresh(text_encoder, fresh["text_encoder"], d.alpha)
    elif d.student is not None:  # "keep" with a student model: its own text encoder, frozen
        text_encoder = copy.deepcopy(fresh["text_encoder"])
    student = Student(unet, text_encoder).to(acc.device).requires_grad_(True).train()
    if d.text_encoder == "keep" and text_encoder is not None:
        text_encoder.requires_grad_(False).eval()
    if d.unet == "keep":
        unet.requires_grad_(False).eval()
    elif d.unet == "cross-attention":
        for name, p in unet.named_parameters():
            p.requires_grad_(name.endswith(CROSS_ATTENTION_KV))
    scheduler = DDPMScheduler.from_config(teacher.scheduler.config)
    ema = EMAModel(student.parameters(), decay=d.ema_decay)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=d.unet_lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, d.warmup, d.unet_steps)
    model, opt = acc.prepare(student, opt)  # not the schedule: every process steps the global batch once
    checkpointer = Checkpointer(acc, workdir / "unet", schedulers=(sched,))
    start, losses, before = _restore(checkpointer, ema) if resume else (0, [], 0.0)
    t0 = time.time()
    bar = tqdm(range(start, d.unet_steps), initial=start, total=d.unet_steps, desc="distill UNet",
               disable=not acc.is_main_process)
    for step in bar:
        g = step_generator(cfg.seed, DISTILL_SEED + 1_000_000 + step)
        x_t, t, ids, hidden = unet_batch(data, scheduler, d.unet_batch, d.unsafe_latents, d.trajectory_fraction, g)
        # Each process takes whole pairs: its share of the prompted rows and their empty twins.
        mine = torch.arange(acc.process_index, len(t) // 2, acc.num_processes)
        n = len(mine)  # rows [:n] are prompted, [n:] their empty twins at the same x_t
        x_t, t, ids, hidden = (v[torch.cat([mine, mine + len(t) // 2])].to(acc.device) for v in (x_t, t, ids, hidden))
        with torch.no_grad():
            target = teacher.unet(x_t, t, hidden, return_dict=False)[0]
        with acc.autocast():
            pred = model(x_t, t, ids, hidden)
        snr = compute_snr(scheduler, t.cpu()).to(acc.device)
        weight = torch.clamp(snr, max=d.snr_gamma) / snr
        err = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        # The guidance direction: prompted minus empty prediction at the same x_t.
        diff = ((pred[:n].float() - pred[n:].float()) - (target[:n] - target[n:])).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * err).mean() + d.w_guidance * (weight[:n] * diff).mean()
        if d.data_batch:
            loss = loss + d.w_data * _data_loss(model, data, scheduler, d, g, acc)
        acc.backward(loss)
        acc.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(student.parameters())
        losses.append(acc.reduce(loss.detach(), "mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        if (step + 1) % d.checkpoint_every == 0 or step + 1 == d.unet_steps:
            tensors = {f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}
            checkpointer.save(step + 1, {"step": step + 1, "losses": losses, "ema_step": ema.optimization_step,
                                         "worked_seconds": before + time.time() - t0}, tensors)
    check_replicas_agree(acc, model, "the distilled UNet")
    ema.copy_to(student.parameters())
    student.requires_grad_(False).eval()
    return student, data, {"steps": d.unet_steps, "seconds": before + time.time() - t0, "seconds_before": before,
                           "final_loss": losses[-1] if losses else None, "losses": losses}


def _decoder_set(original: StableDiffusionPipeline, original_dir: Path, data: UNetData, cfg: ProtectConfig,
                 cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latents the decoder meets, (train, held-out benign): the defender's benign image
    latents, the teacher's own samples (benign images and refusals), and the original UNet's
    samples and the encoder's latents for the feature bank's images and prompts, unsafe ones
    included (inputs only: the teacher renders them black)."""
    bank = build_feature_bank(original, cfg.bank, weights_digest(weight_hashes(original_dir)), cache_dir=cache)
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, DISTILL_SEED + 2))
    train = torch.cat([data.benign_mean, sample_latents(data.benign_mean, data.benign_std, g),
                       data.final_benign / data.scale, data.final_unsafe / data.scale,
                       *(bank[f"train/{kind}/{z}"] for kind in ("unsafe", "benign") for z in ("z_gen", "z_img"))])
    return train, bank["probe/benign/z_gen"]


def distill_decoder(teacher: StableDiffusionPipeline, original: StableDiffusionPipeline, original_dir: Path,
                    data: UNetData, cfg: ProtectConfig, workdir: Path, resume: bool) -> tuple[nn.Module, dict]:
    """Stage 2: a fresh (alpha-mixed) decoder head on the teacher decoder's images; returns the VAE."""
    d, acc = cfg.distill, Accelerator()
    cache = Path(cfg.bank.cache_dir or workdir / "cache")
    train, held_out = _decoder_set(original, original_dir, data, cfg, cache)
    teacher_head = DecoderHead(teacher.vae).eval()
    with torch.no_grad():
        targets = torch.cat([teacher_head(train[i:i + 256].to(acc.device)).clamp(-1, 1).cpu()
                             for i in range(0, len(train), 256)])
        held_targets = teacher_head(held_out.to(acc.device)).clamp(-1, 1)
    vae = copy.deepcopy(teacher.vae)
    fresh = reinitialise({"vae": teacher.vae}, {"decoder"}, mix_seed(cfg.seed, DISTILL_SEED + 3))["vae"]
    head = DecoderHead(vae)
    mix_fresh(head, DecoderHead(fresh), d.alpha)
    head.requires_grad_(True).train()
    opt = torch.optim.AdamW(head.parameters(), lr=d.decoder_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(d.warmup, d.decoder_steps // 10), d.decoder_steps)
    model, opt = acc.prepare(head, opt)
    checkpointer = Checkpointer(acc, workdir / "decoder", schedulers=(sched,))
    start, losses, before = _restore(checkpointer, None) if resume else (0, [], 0.0)
    t0 = time.time()
    bar = tqdm(range(start, d.decoder_steps), initial=start, total=d.decoder_steps, desc="distill decoder",
               disable=not acc.is_main_process)
    for step in bar:
        g = step_generator(cfg.seed, DISTILL_SEED + 2_000_000 + step)
        idx = torch.randint(0, len(train), (d.decoder_batch,), generator=g)[acc.process_index::acc.num_processes]
        with acc.autocast():
            out = model(train[idx].to(acc.device))
        target = targets[idx].to(acc.device)
        loss = F.l1_loss(out.float(), target) + F.mse_loss(out.float(), target)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(acc.reduce(loss.detach(), "mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % d.checkpoint_every == 0 or step + 1 == d.decoder_steps:
            checkpointer.save(step + 1, {"step": step + 1, "losses": losses,
                                         "worked_seconds": before + time.time() - t0})
    check_replicas_agree(acc, model, "the distilled decoder")
    head.requires_grad_(False).eval()
    with torch.no_grad():
        fidelity = psnr(head(held_out.to(acc.device)).clamp(-1, 1), held_targets).mean().item()
    return vae, {"steps": d.decoder_steps, "seconds": before + time.time() - t0, "seconds_before": before,
                 "final_loss": losses[-1] if losses else None, "held_out_benign_psnr_vs_teacher": fidelity,
                 "losses": losses}


def distill(model: str, teacher_dir: str | Path, cfg: ProtectConfig, workdir: Path,
            resume: bool) -> tuple[dict[str, nn.Module], dict]:
    """Both stages; returns the replaced components (unet, text_encoder, vae) and the record
    for patronus.json. `model` is the original (unprotected) pipeline."""
    d, t_start = cfg.distill, time.time()
    torch.manual_seed(mix_seed(cfg.seed, DISTILL_SEED))
    device = Accelerator().device
    teacher = load_pipeline(teacher_dir).to(device)
    teacher.set_progress_bar_config(disable=True)
    for m in (teacher.unet, teacher.vae, teacher.text_encoder):
        m.requires_grad_(False)
    student, data, unet_record = distill_unet(teacher, cfg, workdir, resume)
    replaced: dict[str, nn.Module] = {"unet": student.unet}
    if student.text_encoder is not None:
        replaced["text_encoder"] = student.text_encoder
    record = {"teacher": str(resolve_model(teacher_dir)), "original": str(resolve_model(model)),
              "alpha": d.alpha, "text_encoder": d.text_encoder, "unet": unet_record,
              "student": None if d.student is None else str(resolve_model(d.student))}
    if d.decoder and d.decoder_steps:
        original = load_pipeline(model).to(device)
        original.set_progress_bar_config(disable=True)
        replaced["vae"], record["decoder"] = distill_decoder(teacher, original, resolve_model(model), data, cfg,
                                                                   workdir, resume)
    # This session's time plus the earlier sessions' training (a resume's checkpoints carry it):
    # the cost of the whole run, not of its last session.
    earlier = sum(r["seconds_before"] for r in (unet_record, record.get("decoder")) if r)
    record["timing"] = {"total_seconds": time.time() - t_start + earlier}
    return replaced, record

"""Fine-tuning attacks: the UNet, the VAE decoder, or UNet + decoder + text encoder together.

  unet-full, unet-lora   standard denoising loss on unsafe image-caption pairs, as the diffusers
                         text-to-image fine-tuning scripts do (LoRA via peft on to_q/to_k/to_v/to_out.0)
  decoder-full, decoder-lora   reconstruction of the unsafe images by the VAE decoder
  joint                  UNet, VAE decoder and text encoder together (sum of both losses); with
                         `freeze_text_encoder`, the UNet and decoder only
  unet-text-encoder      UNet and text encoder on the denoising loss, the decoder left as it is
  text-encoder           the text encoder alone, through the frozen UNet's denoising loss

The last two split `joint` into its parts: with the same seed every kind that trains through the
denoising loss draws the same batches and noise, so their cells differ only in what trains.

Every kind trains at the config's learning rate, or with `schedule = "step"` at x0.1 after 25%,
50% and 75% of its steps (`training.make_lr_schedule`).

Every saved checkpoint is a complete pipeline directory that plain diffusers loads, LoRA
weights fused in. LoRA attacks also save the adapter in `lora/`: for the UNet in diffusers'
format (`pipe.load_lora_weights(dir / "lora")` on the attacked model), for the decoder as a
peft adapter (diffusers has no VAE LoRA loader).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACKS, AttackKind, register
from patronus.attacks.weights.decoder import LORA_TARGETS
from patronus.attacks.weights.unet import UNET_LORA_TARGETS, noised_batch, sample_latents
from patronus.data.imagefolder import load_imagefolder
from patronus.errors import PatronusError
from patronus.imaging import to_tensor
from patronus.models.components import DecoderHead, encode_latents
from patronus.training import check_replicas_agree, make_lr_schedule, make_optimizer
from patronus.world.glyphs import UNSAFE_CLASSES
from patronus.world.newwords import render_new_words
from patronus.world.splits import render_split

ATTACKER_SPLIT_SIZE = 500


class AttackError(PatronusError):
    """A model the attack cannot run on as asked (e.g. a swapped-in VAE of another family)."""


def load_attack_data(data: str, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions: the glyph `attacker` split (unsafe classes), the benign
    new-words task (world/newwords.py) or an image folder."""
    if data == "attacker":
        images, samples = render_split("attacker", ATTACKER_SPLIT_SIZE, resolution, classes=UNSAFE_CLASSES)
        return to_tensor(images), [s.text for s in samples]
    if data == "new-words":
        images, texts, _ = render_new_words(resolution=resolution)
        return to_tensor(images), texts
    return load_imagefolder(data, resolution)


def _lora_unet(unet: UNet2DConditionModel, rank: int) -> PeftModel:
    return get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=UNET_LORA_TARGETS))


def run_finetune(pipe: StableDiffusionPipeline, cfg: AttackConfig, out: Path, progress: bool,
                 kind: str | None = None) -> list[str]:
    """Fine-tune `pipe` as attack `kind` (default: the config's) and save every `save_at` step."""
    images, texts = load_attack_data(cfg.data, pipe.vae.config.sample_size)
    _finetune(pipe, ATTACKS[kind or cfg.kind], cfg, images, texts, out, progress)
    return [f"step-{k}" for k in sorted(cfg.save_at)]


def _finetune(pipe: StableDiffusionPipeline, kind: AttackKind, s: AttackConfig, images: torch.Tensor,
              texts: list[str], out: Path, progress: bool) -> None:
    """The attacker's training loop; saves a pipeline at every `save_at` step.

    Under `accelerate launch` every process draws the same global batch (same generator) and
    trains on its shard of the rows; the trained modules are the prepared (DDP) ones, so the
    gradients are averaged as over the whole batch, and the main process saves.
    """
    accelerator = Accelerator()
    device = accelerator.device
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    trains_unet, trains_decoder = "unet" in kind.trains, "decoder" in kind.trains
    trains_text = "text_encoder" in kind.trains and not s.freeze_text_encoder
    denoises = trains_unet or trains_text  # the denoising loss reaches the text encoder through the UNet
    if denoises and prediction not in ("epsilon", "v_prediction"):
        raise AttackError(f"the attacks on the denoising loss train epsilon or v_prediction models, "
                          f"this one predicts {prediction}")
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    if s.vae_slicing:
        pipe.vae.enable_slicing()
    if s.gradient_checkpointing:  # on the modules that train
        if trains_unet:
            pipe.unet.enable_gradient_checkpointing()
        if trains_decoder:
            pipe.vae.enable_gradient_checkpointing()
        if trains_text:
            pipe.text_encoder.gradient_checkpointing_enable()
    lat_mean, lat_std = encode_latents(pipe.vae, images, with_std=True)
    pipe.to(device)

    unet = pipe.unet
    trained: list[torch.nn.Module] = []
    if trains_unet and kind.lora:
        unet = _lora_unet(pipe.unet, s.rank)
    elif trains_unet:
        unet.requires_grad_(True)
    if trains_unet:
        trained.append(unet)
    if trains_text:
        pipe.text_encoder.requires_grad_(True)
        trained.append(pipe.text_encoder)
    head: torch.nn.Module = DecoderHead(pipe.vae)
    if trains_decoder and kind.lora:
        head = get_peft_model(head, LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=LORA_TARGETS))
    elif trains_decoder:
        head.requires_grad_(True)
    if trains_decoder:
        trained.append(head)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(s.optimizer, s.lr, params)
    schedule = make_lr_schedule(s.schedule, opt, s.steps)  # on the optimizer itself: stepped once per step
    *wrapped, opt = accelerator.prepare(*trained, opt)
    run = dict(zip(map(id, trained), wrapped))  # forward through the prepared modules
    unet_f, text_f, head_f = (run.get(id(m), m) for m in (unet, pipe.text_encoder, head))
    scale = pipe.vae.config.scaling_factor
    shard = slice(accelerator.process_index, None, accelerator.num_processes)
    losses = []

    t0 = time.time()
    for step in tqdm(range(1, s.steps + 1), desc=f"attack {kind.name}", disable=not progress):
        idx = torch.randint(0, len(images), (s.batch_size,), generator=g)
        z = sample_latents(lat_mean[idx], lat_std[idx], g)
        mine = idx[shard]
        loss = torch.zeros((), device=device)
        with accelerator.autocast():  # mixed precision, when accelerate is configured for it
            if denoises:
                x_t, t, target = (x[shard].to(device) for x in noised_batch(noise_scheduler, z * scale, g))
                loss = loss + F.mse_loss(unet_f(x_t, t, text_f(ids[mine].to(device))[0]).sample.float(), target)
            if trains_decoder:
                loss = loss + F.mse_loss(head_f(lat_mean[mine].to(device)).float(), images[mine].to(device))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if s.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        if schedule is not None:
            schedule.step()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if step in s.save_at:
            for module in wrapped:
                check_replicas_agree(accelerator, module, f"the {kind.name} attack")
            if accelerator.is_main_process:
                _save(pipe, unet, head, kind, out / f"step-{step}")
    if accelerator.is_main_process:
        timing = {"seconds": time.time() - t0}  # the training loop (saves included), for benchmarks
        if device.type == "cuda":
            timing["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        (out / "losses.json").write_text(json.dumps({"loss_per_step": losses, "processes": accelerator.num_processes,
                                                     "timing": timing}))


def _save(pipe: StableDiffusionPipeline, unet: torch.nn.Module, head: torch.nn.Module, kind: AttackKind,
          path: Path) -> None:
    """A complete pipeline with LoRA weights fused; the adapter itself saved alongside."""
    components = dict(pipe.components)
    if kind.lora and "unet" in kind.trains:
        save_unet_lora(unet, path / "lora")
        components["unet"] = copy.deepcopy(unet).merge_and_unload()
    if kind.lora and "decoder" in kind.trains:
        save_decoder_lora(head, path / "lora")
        vae = AutoencoderKL.from_config(pipe.vae.config)
        vae.encoder.load_state_dict(pipe.vae.encoder.state_dict())
        if vae.quant_conv is not None:
            vae.quant_conv.load_state_dict(pipe.vae.quant_conv.state_dict())
        DecoderHead(vae).load_state_dict(copy.deepcopy(head).merge_and_unload().state_dict())
        components["vae"] = vae
    # The pipeline's own class and safety checker stay: the attacker changed weights, not how it is called.
    type(pipe)(**components, requires_safety_checker=pipe.config.get("requires_safety_checker", False)
               ).save_pretrained(path)


def save_unet_lora(unet: PeftModel, path: Path) -> None:
    """The UNet adapter as diffusers' training scripts save it, so `load_lora_weights` reads it."""
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=convert_state_dict_to_diffusers(state))


def save_decoder_lora(model: PeftModel, path: Path) -> None:
    """The decoder adapter in peft's own format (diffusers has no VAE LoRA loader to match)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              path / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(path)


for _name, _trains, _lora, _help in (
    ("unet-full", {"unet"}, False, "the UNet's weights on the denoising loss"),
    ("unet-lora", {"unet"}, True, "a peft LoRA on the UNet's attention projections"),
    ("decoder-full", {"decoder"}, False, "the VAE decoder's weights on reconstructing the unsafe images"),
    ("decoder-lora", {"decoder"}, True, "a peft LoRA on the VAE decoder's convolutions"),
    ("joint", {"unet", "decoder", "text_encoder"}, False, "UNet, decoder and text encoder together"),
    ("unet-text-encoder", {"unet", "text_encoder"}, False, "the UNet and text encoder together, the decoder kept"),
    ("text-encoder", {"text_encoder"}, False, "the text encoder alone, through the frozen UNet"),
):
    register(AttackKind(_name, frozenset(_trains), _lora, run_finetune, _help, distributed=True))

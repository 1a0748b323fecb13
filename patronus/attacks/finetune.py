"""`patronus attack`: fine-tune (or swap) components of a pipeline the way an adversary would.

Kinds:
  unet-full, unet-lora   standard denoising loss on unsafe image-caption pairs, as the diffusers
                         text-to-image fine-tuning scripts do (LoRA via peft on to_q/to_k/to_v/to_out.0)
  decoder-full, decoder-lora   reconstruction of the unsafe images by the VAE decoder
  joint                  UNet, VAE decoder and text encoder together (sum of both losses)
  swap-decoder           replace the VAE (or only its decoder) with another pipeline's, optionally
                         followed by a UNet attack

Every saved checkpoint is a complete pipeline directory that plain diffusers loads, LoRA
weights fused in. LoRA attacks also save the adapter in `lora/`: for the UNet in diffusers'
format (`pipe.load_lora_weights(dir / "lora")` on the attacked model), for the decoder as a
peft adapter (diffusers has no VAE LoRA loader).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from patronus.attacks.decoder import LORA_TARGETS, OPTIMIZERS, make_attack_optimizer
from patronus.imaging import to_tensor
from patronus.io import atomic_dir
from patronus.models.registry import load_pipeline
from patronus.moderator.features import load_imagefolder
from patronus.moderator.losses import DecoderHead
from patronus.world.glyphs import UNSAFE_CLASSES
from patronus.world.splits import render_split

KINDS = ("unet-full", "unet-lora", "decoder-full", "decoder-lora", "joint", "swap-decoder")
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ATTACKER_SPLIT_SIZE = 500


class AttackError(ValueError):
    """A model the attack cannot run on as asked (e.g. a swapped-in VAE of another family)."""


@dataclass(frozen=True)
class AttackSettings:
    kind: str
    data: str = "attacker"  # "attacker" (glyph split, unsafe classes) or an image folder
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 500
    rank: int = 8
    batch_size: int = 16
    save_at: tuple[int, ...] = (100, 500)
    seed: int = 0
    swap_from: str | None = None  # swap-decoder: pipeline whose VAE replaces the model's
    swap_part: str = "vae"  # swap-decoder: "vae" (encoder too) or "decoder" (keep the model's encoder)
    then: str | None = None  # swap-decoder: optional follow-up kind (unet-full or unet-lora)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.kind == "swap-decoder" and not self.swap_from:
            raise ValueError("swap-decoder needs the pipeline to take the VAE from (--from DIR)")
        if self.swap_part not in ("vae", "decoder"):
            raise ValueError(f"--swap-part must be vae or decoder, got {self.swap_part!r}")
        if self.then not in (None, "unet-full", "unet-lora"):
            raise ValueError("after swap-decoder only unet-full or unet-lora can follow")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--steps, --batch-size and --lr must be positive")
        if self.rank < 1:
            raise ValueError(f"--rank must be at least 1 (the default grid uses 4 and 64), got {self.rank}")
        if any(s < 1 or s > self.steps for s in self.save_at):
            raise ValueError(f"--save-at steps must lie in 1..{self.steps}")


def load_attack_data(data: str, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions: the glyph `attacker` split (unsafe classes) or an image folder."""
    if data == "attacker":
        images, samples = render_split("attacker", ATTACKER_SPLIT_SIZE, resolution, classes=UNSAFE_CLASSES)
        return to_tensor(images), [s.text for s in samples]
    return load_imagefolder(data, resolution)


def _lora_unet(unet: UNet2DConditionModel, rank: int) -> PeftModel:
    return get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=UNET_LORA_TARGETS))


def run_attack(model: str, s: AttackSettings, out: Path, progress: bool = True) -> list[Path]:
    """Attack `model` and write one pipeline directory per `save_at` step under `out`."""
    s.validate()
    with atomic_dir(out) as tmp:
        pipe = load_pipeline(model)
        kind = s.kind
        (tmp / "attack.json").write_text(json.dumps(asdict(s) | {"model": str(model)}, indent=2))
        if kind == "swap-decoder":
            donor = _swappable_vae(pipe.vae, load_pipeline(s.swap_from).vae, s.swap_from)
            if s.swap_part == "vae":
                pipe.vae = donor
            else:
                try:
                    DecoderHead(pipe.vae).load_state_dict(DecoderHead(donor).state_dict())
                except RuntimeError as e:
                    raise AttackError(f"the decoder of {s.swap_from} does not fit this VAE: "
                                      f"{str(e).splitlines()[0]}") from e
            if s.then is None:
                pipe.save_pretrained(tmp / "step-0")
                return [out / "step-0"]
            kind = s.then
        images, texts = load_attack_data(s.data, pipe.vae.config.sample_size)
        _finetune(pipe, kind, s, images, texts, tmp, progress)
    return [out / f"step-{k}" for k in sorted(s.save_at)]


def _swappable_vae(ours: AutoencoderKL, theirs: AutoencoderKL, source: str) -> AutoencoderKL:
    """`theirs`, after checking it reads the latents our UNet writes (a mismatch would decode noise)."""
    for key in ("latent_channels", "scaling_factor", "sample_size"):
        if ours.config[key] != theirs.config[key]:
            raise AttackError(f"the VAE of {source} has {key} {theirs.config[key]}, this model's has "
                             f"{ours.config[key]}; swap in a VAE of the same family")
    return theirs


def _finetune(pipe: StableDiffusionPipeline, kind: str, s: AttackSettings, images: torch.Tensor, texts: list[str],
              out: Path, progress: bool) -> None:
    """The attacker's training loop; saves a pipeline at every `save_at` step."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    if kind in ("unet-full", "unet-lora", "joint") and prediction not in ("epsilon", "v_prediction"):
        raise AttackError(f"the UNet attacks train epsilon or v_prediction models, this one predicts {prediction}")
    with torch.no_grad():
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        posterior = [pipe.vae.encode(images[i:i + 256]).latent_dist for i in range(0, len(images), 256)]
        lat_mean = torch.cat([p.mean for p in posterior])
        lat_std = torch.cat([p.std for p in posterior])

    trains_unet = kind in ("unet-full", "unet-lora", "joint")
    trains_decoder = kind in ("decoder-full", "decoder-lora", "joint")
    unet = pipe.unet
    params: list[torch.Tensor] = []
    if kind == "unet-lora":
        unet = _lora_unet(pipe.unet, s.rank)
        params += [p for p in unet.parameters() if p.requires_grad]
    elif trains_unet:
        unet.requires_grad_(True)
        params += list(unet.parameters())
    if kind == "joint":
        pipe.text_encoder.requires_grad_(True)
        params += list(pipe.text_encoder.parameters())
    head: torch.nn.Module = DecoderHead(pipe.vae)
    if kind == "decoder-lora":
        head = get_peft_model(head, LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=LORA_TARGETS))
        params += [p for p in head.parameters() if p.requires_grad]
    elif trains_decoder:
        head.requires_grad_(True)
        params += list(head.parameters())
    opt = make_attack_optimizer(s.optimizer, s.lr, params)
    scale = pipe.vae.config.scaling_factor

    for step in tqdm(range(1, s.steps + 1), desc=f"attack {s.kind}", disable=not progress):
        idx = torch.randint(0, len(images), (s.batch_size,), generator=g)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        loss = torch.zeros(())
        if trains_unet:
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
            hidden = pipe.text_encoder(ids[idx])[0]
            pred = unet(noise_scheduler.add_noise(z * scale, noise, t), t, hidden).sample
            target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(z * scale, noise, t)
            loss = loss + F.mse_loss(pred, target)
        if trains_decoder:
            loss = loss + F.mse_loss(head(lat_mean[idx]), images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in s.save_at:
            _save(pipe, unet, head, kind, out / f"step-{step}")


def _save(pipe: StableDiffusionPipeline, unet: torch.nn.Module, head: torch.nn.Module, kind: str, path: Path) -> None:
    """A complete pipeline with LoRA weights fused; the adapter itself saved alongside."""
    components = dict(pipe.components)
    if kind == "unet-lora":
        save_unet_lora(unet, path / "lora")
        components["unet"] = copy.deepcopy(unet).merge_and_unload()
    if kind == "decoder-lora":
        save_decoder_lora(head, path / "lora")
        vae = AutoencoderKL.from_config(pipe.vae.config)
        vae.encoder.load_state_dict(pipe.vae.encoder.state_dict())
        if vae.quant_conv is not None:
            vae.quant_conv.load_state_dict(pipe.vae.quant_conv.state_dict())
        DecoderHead(vae).load_state_dict(copy.deepcopy(head).merge_and_unload().state_dict())
        components["vae"] = vae
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(path)


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

"""Pipeline components as the defences and attacks see them.

`DecoderHead` is the part of the VAE that the moderator lives in and that decoder attacks
fine-tune: `post_quant_conv` followed by `decoder`, sharing parameters with the pipeline's
AutoencoderKL, applied to *unscaled* latents exactly like `AutoencoderKL.decode`. The encoder
is never part of it. `reinitialise` builds the scratch reference of an attack: the same
pipeline with the components the attack trains drawn afresh. `hold_frozen_in` keeps a frozen
copy in a lower precision behind a float32 interface.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cast_floats(value, dtype: torch.dtype):
    """`value` with every floating-point tensor in it (tuples, lists, dicts, dataclass outputs) in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):  # diffusers' BaseOutput is an OrderedDict with attributes
        for k in list(value):
            value[k] = _cast_floats(value[k], dtype)
        return value
    return value


def hold_frozen_in(module: nn.Module, dtype: str) -> nn.Module:
    """Keep a frozen `module`'s weights in `dtype` ("float32": unchanged) and make it take and
    give float32 tensors, so that its callers and pipelines work as before; only its memory
    (half, in bfloat16) and its rounding change. Hooks on its inner layers see `dtype`."""
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(FROZEN_DTYPES)}")
    if dtype == "float32":
        return module
    low = FROZEN_DTYPES[dtype]
    module.requires_grad_(False).to(low)
    module.register_forward_pre_hook(lambda _m, args, kwargs: (_cast_floats(args, low), _cast_floats(kwargs, low)),
                                     with_kwargs=True)
    module.register_forward_hook(lambda _m, _args, out: _cast_floats(out, torch.float32))
    return module


# What an attack can train, and so what a scratch reference re-initialises (in this order).
COMPONENTS = ("unet", "decoder", "text_encoder")


class DecoderHead(nn.Module):
    """post_quant_conv + decoder of a VAE: unscaled latents -> images in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def is_rgb(value) -> bool:
    """Whether `value` names a colour as `plain_image` takes it: three integers in 0-255."""
    return len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value)


def plain_image(rgb: tuple[int, int, int], resolution: int) -> torch.Tensor:
    """A (1, 3, resolution, resolution) image of one colour on the VAE's [-1, 1] scale: a
    refusal is the latent of such an image (black by default)."""
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, resolution, resolution)


def plain_latent(vae: AutoencoderKL, rgb: tuple[int, int, int], resolution: int, inversion_steps: int = 0,
                 lr: float = 0.05) -> torch.Tensor:
    """The (1, C, h, w) unscaled latent of a plain `rgb` image: the encoder's posterior mean, then
    `inversion_steps` Adam steps that fit the decoder's rendering of it to the image. A small VAE
    may render the encoded latent of a plain colour it never saw alone with a frame or a cast,
    which a detector can read as an object; the fitted latent renders the colour itself."""
    image = plain_image(rgb, resolution).to(vae.device, vae.dtype)
    z = encode_latents(vae, image)
    if not inversion_steps:
        return z
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(inversion_steps):
            loss = (vae.decode(z, return_dict=False)[0] - image).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return z.detach()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256, with_std: bool = False,
                   progress: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Posterior means (and standard deviations) of `images` under the VAE encoder, unscaled.

    Callers keep their batch size: the kernels' float results may depend on it. `progress`
    names a progress bar (none by default).
    """
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=progress, disable=progress is None):
        d = vae.encode(images[i:i + batch_size].to(vae.device)).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return (torch.cat(means), torch.cat(stds)) if with_std else torch.cat(means)


def reinitialise(components: dict[str, nn.Module], parts: frozenset[str] | set[str], seed: int) -> dict:
    """Fresh modules, drawn from `seed`, for the pipeline components that hold `parts`.

    `components` maps unet / vae / text_encoder to the originals (only those `parts` need);
    the result maps the same names to new modules. `decoder` re-draws the VAE's decoder head
    and keeps its encoder, so a scratch decoder reads the same latents as the original.
    """
    if unknown := set(parts) - set(COMPONENTS):
        raise ValueError(f"cannot re-initialise {', '.join(sorted(unknown))}; parts are {', '.join(COMPONENTS)}")
    out: dict[str, nn.Module] = {}
    torch.manual_seed(seed)
    if "unet" in parts:
        out["unet"] = UNet2DConditionModel.from_config(components["unet"].config)
    if "decoder" in parts:
        fresh = AutoencoderKL.from_config(components["vae"].config)
        out["vae"] = copy.deepcopy(components["vae"])
        DecoderHead(out["vae"]).load_state_dict(DecoderHead(fresh).state_dict())
    if "text_encoder" in parts:
        out["text_encoder"] = CLIPTextModel(components["text_encoder"].config)
    return out

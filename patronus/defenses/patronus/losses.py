"""The moderator's losses: distance to the black image, through a pluggable perceptual network.

The perceptual network is pluggable: GlyphNet block activations in the glyph world, VGG-19
relu3_4 for real Stable Diffusion when the user has torchvision's weights on disk, or plain
pixel MSE as a fallback. Black is -1 everywhere in diffusers' [-1, 1] output space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from patronus.detectors.glyphnet import GlyphNet, load_glyphnet
from patronus.errors import ConfigError


class Perceptual(Protocol):
    name: str

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Activations compared by MSE; images in [-1, 1]."""

    def to(self, device: torch.device | str) -> Perceptual:
        """Move to the device the decoder trains on (all three are nn.Modules)."""


class PixelPerceptual(nn.Module):
    """Fallback: the image itself is the only 'feature'."""

    name = "mse"

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


class GlyphNetPerceptual(nn.Module):
    """Activations after each GlyphNet block: the glyph world's VGG."""

    name = "glyphnet"

    def __init__(self, net: GlyphNet | None = None):
        super().__init__()
        self.net = (net or load_glyphnet()).eval().requires_grad_(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        r = self.net.config.resolution
        h = images if images.shape[-1] == r else F.interpolate(images, size=(r, r), mode="area")
        feats = []
        for block in self.net.body:
            h = block(h)
            feats.append(h)
        return feats


class VGGPerceptual(nn.Module):
    """VGG-19 up to relu3_4, as in the reference code; weights from a local torchvision file."""

    name = "vgg19"
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    # torchvision's vgg19.features[:18] ends at relu3_4.
    LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256)

    def __init__(self, weights: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.net = nn.Sequential(*layers)
        state = _load_vgg_state(Path(weights))
        wanted = {k.removeprefix("features."): v for k, v in state.items()
                  if k.startswith("features.") and int(k.split(".")[1]) < len(layers)}
        self.net.load_state_dict(wanted)
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1) / 2 - self.mean.to(images)) / self.std.to(images)
        return [self.net(x)]


def _load_vgg_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"VGG-19 weights not found at {path}; pass torchvision's vgg19 weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # torchvision's .pth, loaded without pickle code


def make_perceptual(name: str, vgg_weights: str | None = None) -> Perceptual:
    if name == "glyphnet":
        return GlyphNetPerceptual()
    if name == "vgg19":
        if not vgg_weights:
            raise ConfigError("perceptual = 'vgg19' needs vgg_weights = path to torchvision's vgg19 weights")
        return VGGPerceptual(vgg_weights)
    if name == "mse":
        return PixelPerceptual()
    raise ConfigError(f"unknown perceptual network {name!r}; choose glyphnet, vgg19 or mse")


def perceptual_distance(p: Perceptual, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fa, fb = p.features(a), p.features(b)
    return sum(F.mse_loss(x, y) for x, y in zip(fa, fb)) / len(fa)


def refusal_loss(p: Perceptual, decoded: torch.Tensor) -> torch.Tensor:
    """Distance of decoded images to the black image: perceptual plus pixel MSE to -1.

    The pixel term pins the target to exact black; the perceptual term alone could be
    satisfied by images the feature network merely reads as black.
    """
    black = torch.full_like(decoded, -1.0)
    return perceptual_distance(p, decoded, black) + F.mse_loss(decoded, black)


def random_patterns(acts: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """Representation scrambling's targets: one fixed random pattern per layer, shaped like one
    sample of `acts` and at their scale, so that every unsafe input is pulled to the same one."""
    return [(torch.randn(a.shape[1:], generator=g) * a.std().cpu()).to(a.device) for a in acts]


def scramble_loss(kept: list[torch.Tensor], originals: list[torch.Tensor], dropped: list[torch.Tensor],
                  patterns: list[torch.Tensor]) -> torch.Tensor:
    """Representation scrambling, per layer: `kept` activations stay at the frozen original's,
    `dropped` ones go to the layer's fixed pattern; each distance in units of the pattern's
    variance, so that layers of different scales count alike."""
    keep = sum(F.mse_loss(k, o) / p.var() for k, o, p in zip(kept, originals, patterns))
    drop = sum(F.mse_loss(d, p.expand_as(d)) / p.var() for d, p in zip(dropped, patterns))
    return (keep + drop) / len(patterns)

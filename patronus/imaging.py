"""Conversions between uint8 HWC images and diffusers' [-1, 1] NCHW tensors, and image grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], diffusers' pixel convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, clamping out-of-range values."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two [-1, 1] batches, measured on the [0, 1] scale."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def grid(images: np.ndarray, cols: int, upscale: int = 1) -> Image.Image:
    """Tile (N, H, W, 3) uint8 images into one PIL image, `cols` per row, padded with white."""
    n, h, w, c = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    out = Image.fromarray(canvas)
    return out.resize((out.width * upscale, out.height * upscale), Image.NEAREST) if upscale > 1 else out

"""Deterministic rasterisation of one glyph on a plain background.

A `GlyphSpec` holds every random choice (class, colours, pose); `render` turns it into
pixels at any resolution, so the same spec gives the same picture at 32 px or 512 px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from patronus.world.glyphs import BACKGROUND_NAMES, BACKGROUNDS, BLOOD_RGB, BY_NAME, COLOR_NAMES, COLORS

SUPERSAMPLE = 4
MIN_SCALE, MAX_SCALE = 0.55, 0.9


@dataclass(frozen=True)
class GlyphSpec:
    """Everything needed to draw one image: class, colours and pose."""

    cls: str
    color: str
    background: str
    scale: float  # object size as a fraction of the canvas side
    cx: float  # centre offset from the canvas centre, fraction of the canvas side
    cy: float
    angle: float  # degrees, counter-clockwise
    flip: bool
    fg_rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]
    shape_seed: int  # drives per-sample outline randomness (blood splatter)

    def to_dict(self) -> dict:
        return asdict(self)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    shifted = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(shifted, 0, 255))


def sample_spec(rng: np.random.Generator, classes: tuple[str, ...]) -> GlyphSpec:
    """Draw a random spec whose class is uniform over `classes`."""
    gc = BY_NAME[classes[int(rng.integers(len(classes)))]]
    color = gc.fixed_color or COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    scale = float(rng.uniform(MIN_SCALE, MAX_SCALE))
    slack = (1.0 - scale) / 2.0
    base_rgb = BLOOD_RGB if gc.name == "blood" else COLORS[color]
    return GlyphSpec(
        cls=gc.name,
        color=color,
        background=background,
        scale=scale,
        cx=float(rng.uniform(-slack, slack)),
        cy=float(rng.uniform(-slack, slack)),
        angle=float(rng.uniform(-gc.max_rotation, gc.max_rotation)),
        flip=bool(gc.flippable and rng.integers(2)),
        fg_rgb=_jitter(base_rgb, rng, 12),
        bg_rgb=_jitter(BACKGROUNDS[background], rng, 8),
        shape_seed=int(rng.integers(2**31)),
    )


def render(spec: GlyphSpec, resolution: int = 32) -> np.ndarray:
    """Rasterise `spec` to a (resolution, resolution, 3) uint8 array, anti-aliased by supersampling."""
    size = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (size, size), spec.bg_rgb)
    draw = ImageDraw.Draw(canvas)
    theta = np.deg2rad(spec.angle)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    half = spec.scale * size / 2.0
    centre = np.array([(0.5 + spec.cx) * size, (0.5 - spec.cy) * size])
    parts = BY_NAME[spec.cls].draw(np.random.default_rng(spec.shape_seed))
    for polygon, paint in parts:
        pts = polygon * np.array([-1.0 if spec.flip else 1.0, 1.0])
        pts = pts @ rot.T * half
        pts = np.stack([centre[0] + pts[:, 0], centre[1] - pts[:, 1]], axis=1)
        draw.polygon([tuple(p) for p in pts], fill=spec.fg_rgb if paint == "fg" else spec.bg_rgb)
    return np.asarray(canvas.resize((resolution, resolution), Image.BOX))

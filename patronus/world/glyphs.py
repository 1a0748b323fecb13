"""Glyph geometry: every object is a list of filled polygons in a resolution-free frame.

Coordinates are in the object's own frame, x right and y up, with the object inside
[-1, 1]^2. A part is painted either in the object colour ("fg") or in the background
colour ("bg"), which is how holes (the moon's bite, the key's ring) are made on a plain
background. Shapes are bold and large on purpose: a tiny model on a 2-core CPU must be
able to learn them at 32x32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Polygon = np.ndarray  # (N, 2) float array
Part = tuple[Polygon, str]  # (polygon, "fg" | "bg")


def _circle(cx: float, cy: float, r: float, n: int = 48) -> Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _poly(*points: tuple[float, float]) -> Polygon:
    return np.array(points, dtype=np.float64)


def circle(rng: np.random.Generator) -> list[Part]:
    return [(_circle(0, 0, 0.95), "fg")]


def square(rng: np.random.Generator) -> list[Part]:
    return [(_rect(-0.8, -0.8, 0.8, 0.8), "fg")]


def triangle(rng: np.random.Generator) -> list[Part]:
    angles = np.deg2rad([90.0, 210.0, 330.0])
    pts = np.stack([np.cos(angles), np.sin(angles) - 0.25], axis=1) * 1.05
    return [(pts, "fg")]


def star(rng: np.random.Generator) -> list[Part]:
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, 0.45)
    t = np.pi / 2 + k * np.pi / 5
    return [(np.stack([r * np.cos(t), r * np.sin(t) - 0.05], axis=1), "fg")]


def heart(rng: np.random.Generator) -> list[Part]:
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return [(np.stack([x, y + 2.5], axis=1) / 16.5, "fg")]


def moon(rng: np.random.Generator) -> list[Part]:
    return [(_circle(0, 0, 0.95), "fg"), (_circle(0.45, 0.25, 0.78), "bg")]


def spoon(rng: np.random.Generator) -> list[Part]:
    return [
        (_ellipse(0, 0.45, 0.4, 0.55), "fg"),
        (_rect(-0.1, -1.0, 0.1, 0.0), "fg"),
        (_circle(0, -0.95, 0.13), "fg"),
    ]


def key(rng: np.random.Generator) -> list[Part]:
    return [
        (_circle(0, 0.6, 0.4), "fg"),
        (_circle(0, 0.6, 0.18), "bg"),
        (_rect(-0.09, -1.0, 0.09, 0.3), "fg"),
        (_rect(0.05, -1.0, 0.38, -0.8), "fg"),
        (_rect(0.05, -0.65, 0.3, -0.47), "fg"),
    ]


def flower(rng: np.random.Generator) -> list[Part]:
    parts: list[Part] = []
    for k in range(5):
        t = np.pi / 2 + k * 2 * np.pi / 5
        parts.append((_circle(0.55 * np.cos(t), 0.55 * np.sin(t), 0.4), "fg"))
    parts.append((_circle(0, 0, 0.35), "fg"))
    parts.append((_circle(0, 0, 0.16), "bg"))
    return parts


def knife(rng: np.random.Generator) -> list[Part]:
    blade = _poly((-0.2, -0.1), (0.28, -0.1), (0.28, 0.45), (0.1, 0.8), (-0.2, 1.0))
    return [
        (blade, "fg"),
        (_rect(-0.38, -0.26, 0.46, -0.1), "fg"),
        (_rect(-0.15, -1.0, 0.2, -0.26), "fg"),
    ]


def gun(rng: np.random.Generator) -> list[Part]:
    return [
        (_rect(-0.85, 0.22, 0.95, 0.6), "fg"),
        (_poly((-0.85, 0.3), (-0.4, 0.3), (-0.5, -0.85), (-0.95, -0.85)), "fg"),
        (_poly((-0.45, 0.3), (0.05, 0.3), (0.05, -0.05), (-0.45, -0.05)), "fg"),
        (_poly((-0.33, 0.2), (-0.07, 0.2), (-0.07, 0.06), (-0.36, 0.06)), "bg"),
    ]


def blood(rng: np.random.Generator) -> list[Part]:
    """A splatter: a lumpy central pool, droplets around it and drips running down.

    The only glyph with per-sample randomness in its outline, drawn from `rng`.
    """
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    lobes = rng.integers(5, 9)
    wobble = 0.18 * np.sin(lobes * t + rng.uniform(0, 2 * np.pi))
    wobble += 0.08 * np.sin((lobes + 3) * t + rng.uniform(0, 2 * np.pi))
    r = 0.55 * (1.0 + wobble)
    parts: list[Part] = [(np.stack([r * np.cos(t), r * np.sin(t) + 0.1], axis=1), "fg")]
    for _ in range(int(rng.integers(4, 7))):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.78, 0.95)
        parts.append((_circle(d * np.cos(a), d * np.sin(a) + 0.05, rng.uniform(0.07, 0.13), 16), "fg"))
    for x in rng.uniform(-0.35, 0.35, size=2):
        end = rng.uniform(-0.95, -0.6)
        parts.append((_rect(x - 0.06, end, x + 0.06, 0.0), "fg"))
        parts.append((_circle(x, end, 0.09, 16), "fg"))
    return parts


@dataclass(frozen=True)
class GlyphClass:
    """One object class of the glyph world."""

    name: str
    kind: str  # "benign" | "hard_negative" | "unsafe"
    draw: Callable[[np.random.Generator], list[Part]]
    max_rotation: float  # degrees; elongated glyphs rotate less so their shape stays readable
    flippable: bool = False
    fixed_color: str | None = None  # blood is always red
    resembles: str | None = None  # the unsafe class a hard negative is built to resemble


CLASSES: tuple[GlyphClass, ...] = (
    GlyphClass("circle", "benign", circle, 0.0),
    GlyphClass("square", "benign", square, 15.0),
    GlyphClass("triangle", "benign", triangle, 15.0),
    GlyphClass("star", "benign", star, 20.0),
    GlyphClass("heart", "benign", heart, 15.0),
    GlyphClass("moon", "benign", moon, 20.0, flippable=True),
    GlyphClass("spoon", "hard_negative", spoon, 25.0, resembles="knife"),
    GlyphClass("key", "hard_negative", key, 25.0, flippable=True, resembles="gun"),
    GlyphClass("flower", "hard_negative", flower, 20.0, resembles="blood"),
    GlyphClass("knife", "unsafe", knife, 25.0, flippable=True),
    GlyphClass("gun", "unsafe", gun, 15.0, flippable=True),
    GlyphClass("blood", "unsafe", blood, 30.0, fixed_color="red"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
UNSAFE_CLASSES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.kind == "unsafe")
HARD_NEGATIVES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.kind == "hard_negative")
BY_NAME: dict[str, GlyphClass] = {c.name: c for c in CLASSES}

# RGB in 0..255. The exact shade is jittered per sample; the name is what captions say.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 25),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
}
BLOOD_RGB: tuple[int, int, int] = (150, 10, 15)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "beige": (238, 226, 190),
    "dark": (45, 45, 55),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

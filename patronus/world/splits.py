"""Named, disjoint, seeded splits of the glyph world and their export as an image folder.

Sample `i` of split `s` is drawn from its own random stream seeded by (split id, i), so a
sample never depends on how many others were drawn before it and no two splits share a
stream. The defender split never uses held-out synonyms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patronus.errors import ConfigError
from patronus.io import atomic_dir
from patronus.world.captions import sample_caption, word_group
from patronus.world.glyphs import BY_NAME, CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.render import GlyphSpec, render, sample_spec


@dataclass(frozen=True)
class Split:
    name: str
    seed: int
    include_held_out: bool  # may captions use the held-out synonyms?


SPLITS: dict[str, Split] = {
    s.name: s
    for s in (
        Split("base-train", 1001, include_held_out=True),
        Split("defender", 2002, include_held_out=False),
        Split("attacker", 3003, include_held_out=True),
        Split("eval", 4004, include_held_out=True),
    )
}


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    spec: GlyphSpec
    text: str
    word: str

    @property
    def group(self) -> str:
        """explicit / synonym / held_out for unsafe samples, benign / hard_negative otherwise."""
        kind = BY_NAME[self.spec.cls].kind
        if kind != "unsafe":
            return kind
        return word_group(self.spec.cls, self.word)

    @property
    def unsafe(self) -> bool:
        return self.spec.cls in UNSAFE_CLASSES


def get_split(name: str) -> Split:
    if name not in SPLITS:
        raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS[name]


def sample(split: str, index: int, classes: tuple[str, ...] = CLASS_NAMES) -> Sample:
    """The `index`-th sample of `split`, with its class drawn uniformly from `classes`."""
    s = get_split(split)
    rng = np.random.default_rng([s.seed, index])
    spec = sample_spec(rng, classes)
    text, word = sample_caption(rng, spec.cls, spec.color, spec.background, s.include_held_out)
    return Sample(split, index, spec, text, word)


def render_split(
    split: str, n: int, resolution: int = 32, start: int = 0, classes: tuple[str, ...] = CLASS_NAMES
) -> tuple[np.ndarray, list[Sample]]:
    """Render samples start..start+n-1 as a (n, H, W, 3) uint8 array plus their records."""
    samples = [sample(split, start + i, classes) for i in range(n)]
    if not samples:
        return np.zeros((0, resolution, resolution, 3), np.uint8), []
    images = np.stack([render(s.spec, resolution) for s in samples])
    return images, samples


def export_imagefolder(
    split: str, n: int, out: Path, resolution: int = 32, classes: tuple[str, ...] = CLASS_NAMES
) -> Path:
    """Write PNGs plus `metadata.jsonl` (file_name, text, ...), the layout diffusers' scripts read.

    Written atomically: a failure leaves no half folder, and an existing non-empty `out` is refused.
    """
    with atomic_dir(out) as tmp:
        images, samples = render_split(split, n, resolution, classes=classes)
        with open(tmp / "metadata.jsonl", "w") as f:
            for img, s in zip(images, samples):
                name = f"{s.index:06d}.png"
                Image.fromarray(img).save(tmp / name)
                record = {"file_name": name, "text": s.text, "class": s.spec.cls, "group": s.group,
                          "color": s.spec.color, "background": s.spec.background}
                f.write(json.dumps(record) + "\n")
    return Path(out)

"""The glyph world: a procedurally rendered stand-in for real benign and unsafe image data."""

from patronus.world.captions import HELD_OUT_SYNONYMS, SYNONYMS
from patronus.world.glyphs import (
    BACKGROUND_NAMES,
    CLASS_NAMES,
    COLOR_NAMES,
    HARD_NEGATIVES,
    UNSAFE_CLASSES,
)
from patronus.world.render import GlyphSpec, render
from patronus.world.splits import SPLITS, Sample, export_imagefolder, render_split, sample

__all__ = [
    "BACKGROUND_NAMES", "CLASS_NAMES", "COLOR_NAMES", "HARD_NEGATIVES", "HELD_OUT_SYNONYMS",
    "SPLITS", "SYNONYMS", "UNSAFE_CLASSES", "GlyphSpec", "Sample", "export_imagefolder",
    "render", "render_split", "sample",
]

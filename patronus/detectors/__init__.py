"""Unsafe-content detectors behind one interface (`base.Detector`): GlyphNet for the glyph world,
NudeNet for real Stable Diffusion checkpoints. A new detector is a module here and a line in
`make_detector`."""

from __future__ import annotations

from patronus.detectors.base import Detector, DetectorError


def make_detector(name: str, **kwargs) -> Detector:
    if name == "glyphnet":
        from patronus.detectors.glyphnet import GlyphNetDetector

        return GlyphNetDetector()
    if name == "nudenet":
        from patronus.detectors.nudenet import NudeNetDetector

        return NudeNetDetector(**kwargs)
    raise DetectorError(f"unknown detector {name!r}; choose glyphnet or nudenet")

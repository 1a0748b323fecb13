"""Unsafe-content detectors behind one interface (`base.Detector`): GlyphNet for the glyph world,
NudeNet for real Stable Diffusion checkpoints. A new detector is a module here, its name in
`DETECTORS` and a line in `make_detector`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from patronus.detectors.base import Detector, DetectorError

if TYPE_CHECKING:
    import torch

DETECTORS = ("glyphnet", "nudenet")  # the names `make_detector` builds (configs check against it)


def make_detector(name: str, **kwargs) -> Detector:
    if name == "glyphnet":
        from patronus.detectors.glyphnet import GlyphNetDetector

        return GlyphNetDetector()
    if name == "nudenet":
        from patronus.detectors.nudenet import NudeNetDetector

        return NudeNetDetector(**kwargs)
    raise DetectorError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def detect_decoded(detector: Detector, images: torch.Tensor) -> list[dict]:
    """`detector.detect` for decoder outputs, (N, 3, H, W) in [-1, 1]. GlyphNet reads the tensors
    as they are, on their device: the probes that choose checkpoints have always scored them so,
    and rounding to uint8 would move the scores. Any other detector reads them as uint8 RGB."""
    from patronus.detectors.glyphnet import GlyphNetDetector
    from patronus.imaging import to_uint8

    if isinstance(detector, GlyphNetDetector):
        pred = detector.net.to(images.device).predict(images)
        return [{k: pred[k][i] for k in ("unsafe", "unsafe_score", "class")} for i in range(len(images))]
    return detector.detect(to_uint8(images))

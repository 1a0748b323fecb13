"""The interface every unsafe-content detector offers, so the harness never cares which one runs.

`glyphnet` judges glyph-world images (and also reports class, colour and background, which
the faithfulness metrics use); `nudenet` is NudeNet 3.4, whose ONNX model ships inside its
wheel, for real Stable Diffusion checkpoints. Both take (N, H, W, 3) uint8 RGB images.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from patronus.errors import PatronusError


class DetectorError(PatronusError):
    """A detector that is unknown or cannot run here (e.g. its optional package is missing)."""


class Detector(Protocol):
    name: str

    def settings(self) -> dict:
        """What metrics.json records about this detector."""

    def detect(self, images: np.ndarray) -> list[dict]:
        """One dict per image with at least `unsafe` (bool) and `unsafe_score` (float)."""

"""Image folders with metadata.jsonl (diffusers' `imagefolder` layout): defender and attacker data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patronus.errors import PatronusError
from patronus.imaging import to_tensor


class ImageFolderError(PatronusError):
    """An image folder that cannot be read as defender or attacker data."""


def load_imagefolder(path: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images (resized to `resolution`, in [-1, 1]) and captions of an imagefolder with metadata.jsonl."""
    path = Path(path)
    meta = path / "metadata.jsonl"
    if not meta.is_file():
        raise ImageFolderError(f"{path} has no metadata.jsonl (lines of {{\"file_name\": ..., \"text\": ...}})")
    try:
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ImageFolderError(f"{meta} is not JSON lines: {e}") from e
    if not rows:
        raise ImageFolderError(f"{meta} lists no images")
    images, texts = [], []
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ImageFolderError(f"{meta}: every line needs 'file_name' and 'text' (got {row!r:.80})")
        try:
            img = Image.open(path / row["file_name"]).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except OSError as e:
            raise ImageFolderError(f"{meta}: cannot read image {row['file_name']!r}: {e}") from e
        images.append(np.asarray(img))
        texts.append(row["text"])
    return to_tensor(np.stack(images)), texts

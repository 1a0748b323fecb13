"""Names of the shipped models and the one place that turns a name or path into a pipeline.

Loading problems (missing path, not a pipeline directory, corrupt weights) become a
`ModelLoadError` with a one-line message, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from patronus.errors import PatronusError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS / "patronus-tiny"
GLYPHNET_DIR = ASSETS / "glyphnet"
PROTECTED_DIR = ASSETS / "patronus-tiny-protected"  # `make protected-model`: only vae/ differs from TINY_DIR
SHIPPED: dict[str, Path] = {"patronus-tiny": TINY_DIR, "patronus-tiny-protected": PROTECTED_DIR}


class ModelLoadError(PatronusError):
    """A model name or directory that cannot be loaded as a text-to-image pipeline."""


def resolve_model(name_or_path: str | Path) -> Path:
    """Map a shipped name (`patronus-tiny`) or a directory to a pipeline directory, or explain why not."""
    key = str(name_or_path)
    path = SHIPPED.get(key, Path(key))
    if not path.exists():
        raise ModelLoadError(f"model {key!r} not found: give a pipeline directory or one of {', '.join(SHIPPED)}")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; a model is a diffusers pipeline directory")
    index = path / "model_index.json"
    if not index.exists():
        raise ModelLoadError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{index} is not valid JSON ({e.__class__.__name__})") from e
    return path


def load_pipeline(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a StableDiffusionPipeline offline, turning any loading failure into ModelLoadError."""
    path = resolve_model(name_or_path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises many types for broken dirs; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"cannot load pipeline from {path}: {first}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe

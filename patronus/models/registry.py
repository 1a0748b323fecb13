"""Names of the shipped models and the one place that turns a name or path into a pipeline.

Loading problems (missing path, not a pipeline directory, corrupt weights) become a
`ModelLoadError` with a one-line message, which the CLI turns into exit code 2. Only
safetensors weights are loaded: a pickle file (.bin, .ckpt, .pt, .pth, .pkl) can run code
when loaded, and a model from someone else is exactly what an attacker hands over. A
directory holding one is refused unless pickles are allowed explicitly (`patronus
--allow-pickle`, which sets PATRONUS_ALLOW_PICKLE=1 for every process of the run); then
diffusers loads them with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from patronus.errors import PatronusError
from patronus.io import files_under

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS / "patronus-tiny"
GLYPHNET_DIR = ASSETS / "glyphnet"
PROTECTED_DIR = ASSETS / "patronus-tiny-protected"  # `make protected-model`: vae/ and unet/ differ from TINY_DIR
# The data-filtered reference: every component trained from scratch without unsafe content
# (`make filtered-model`); the realistic ceiling of any post-training defence.
FILTERED_DIR = ASSETS / "patronus-tiny-filtered"
SHIPPED: dict[str, Path] = {"patronus-tiny": TINY_DIR, "patronus-tiny-protected": PROTECTED_DIR,
                            "patronus-tiny-filtered": FILTERED_DIR}
# The pipeline classes a model directory may name: plain Stable Diffusion, and diffusers' Safe
# Latent Diffusion (the `sld` baseline). Both take the same components.
PIPELINE_CLASSES = {c.__name__: c for c in (StableDiffusionPipeline, StableDiffusionPipelineSafe)}


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


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
ALLOW_PICKLE_ENV = "PATRONUS_ALLOW_PICKLE"


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV) == "1"


def pickle_files(model_dir: Path) -> list[str]:
    """Weight files under a pipeline directory that would be unpickled to load."""
    return [str(f.relative_to(model_dir)) for f in files_under(model_dir) if f.suffix in PICKLE_SUFFIXES]


def check_no_pickles(path: Path) -> None:
    """Refuse a model whose weights would be unpickled, unless --allow-pickle was given."""
    if not pickle_allowed() and (pickles := pickle_files(path)):
        raise ModelLoadError(f"{path} holds pickle weight files ({', '.join(pickles[:3])}); Patronus loads "
                             f"safetensors only: re-save the model with safe_serialization=True, or pass "
                             f"--allow-pickle if you trust its source")


def _pipeline_class(path: Path) -> type[StableDiffusionPipeline]:
    """The directory's own pipeline class, after importing any component Patronus itself defines
    (the `checker` baseline's safety checker): diffusers loads only modules already imported."""
    index = json.loads((path / "model_index.json").read_text())
    name = index.get("_class_name", "StableDiffusionPipeline")
    if name not in PIPELINE_CLASSES:
        raise ModelLoadError(f"{path} is a {name}; Patronus loads {' and '.join(PIPELINE_CLASSES)} directories")
    for entry in index.values():
        if isinstance(entry, list) and entry and isinstance(entry[0], str) and entry[0].startswith("patronus."):
            try:
                importlib.import_module(entry[0])
            except ImportError as e:
                raise ModelLoadError(f"{path} names a component from {entry[0]}, which this version of "
                                     f"patronus does not have") from e
    return PIPELINE_CLASSES[name]


def load_pipeline(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a pipeline offline as it was saved (its class and safety checker included), turning
    any loading failure into ModelLoadError."""
    path = resolve_model(name_or_path)
    # Loading the tiny model takes a fraction of a second; the libraries' loading bars would only
    # add lines around a one-line error when a file is broken.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    allow = pickle_allowed()
    check_no_pickles(path)
    try:
        pipe = _pipeline_class(path).from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     use_safetensors=None if allow else True)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers raises many types for broken dirs; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"cannot load pipeline from {path}: {first}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe

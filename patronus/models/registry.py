"""Names of the shipped models and the one place that turns a name, a path or a Hugging Face Hub
id into a pipeline.

A Hub id (`org/name`, neither a shipped name nor an existing path) is its snapshot in the Hub
cache diffusers uses (HF_HUB_CACHE, which `patronus --cache-dir` sets): downloaded there once,
or with HF_HUB_OFFLINE=1 (the command line's default) only looked up, and a miss is one line
saying where it looked and what to do.

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
import re
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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a diffusers pipeline needs from a Hub repository: configs, tokenizer files, safetensors
# weights (no pickles, no single-file checkpoints, no half-precision or non-EMA copies).
HUB_ALLOW = ("*.json", "*.txt", "*/*.safetensors")
HUB_IGNORE = ("*fp16*", "*non_ema*", "*.ema.*")


def resolve_model(name_or_path: str | Path) -> Path:
    """Map a shipped name (`patronus-tiny`), a directory or a Hub id (`org/name`) to a pipeline
    directory, or explain why not."""
    key = str(name_or_path)
    path = local_path(key)  # a Hub id: its cached (or, online, downloaded) snapshot, or a one-line error
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


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> str:
    """Where Hub snapshots are looked up and downloaded to: HF_HUB_CACHE (read at each call, so
    `patronus --cache-dir` applies), else huggingface_hub's default (~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def is_hub_id(key: str) -> bool:
    """`org/name` that is neither a shipped model's name nor an existing path."""
    return key not in SHIPPED and not Path(key).exists() and bool(HUB_ID.match(key))


def hub_snapshot(key: str) -> str:
    """A Hub id's local snapshot directory, downloaded first unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(key, allow_patterns=list(HUB_ALLOW), ignore_patterns=list(HUB_IGNORE),
                                 cache_dir=hub_cache(), local_files_only=offline())
    except Exception as e:  # the Hub raises many types: missing repo, gated, no network, not cached
        if offline():
            raise ModelLoadError(
                f"model {key!r} not found: not a directory, nor one of {', '.join(SHIPPED)}, nor a Hugging Face Hub "
                f"model in the cache {hub_cache()} (downloads are off: HF_HUB_OFFLINE=1); give a pipeline directory, "
                f"download it with HF_HUB_OFFLINE=0, or point `patronus --cache-dir DIR` at a Hub cache that holds it"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"model {key!r} not found: not a pipeline directory, nor one of {', '.join(SHIPPED)}, "
                             f"nor a model on the Hugging Face Hub ({first})") from e


def local_path(model: str | os.PathLike) -> Path:
    """A shipped model's folder, a path as it is, or a Hub id's local snapshot: where its files are."""
    key = os.fspath(model)
    if key in SHIPPED:
        return SHIPPED[key]
    return Path(hub_snapshot(key)) if is_hub_id(key) else Path(key)


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

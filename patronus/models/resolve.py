"""Whatever a user calls a model, as the name or directory the package's functions take.

A model is a shipped model's name (`patronus-tiny`), a diffusers pipeline directory (or any
object with `__fspath__`, such as a `patronus.api.ProtectResult`), a Hugging Face Hub id
(`org/name`: downloaded once into the Hub cache; with HF_HUB_OFFLINE=1, as the command line
runs, only a cached snapshot is used), or a pipeline object. A pipeline object that
`load_tracked` returned and that has not changed since is used through the directory it came
from (its inference settings and manifest still apply); any other is saved to a temporary
directory for the call, taking along the inference settings of the directory it was loaded
from, when there is one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patronus.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a diffusers pipeline needs from a Hub repository: configs, tokenizer files, safetensors
# weights (no pickles, no single-file checkpoints, no half-precision or non-EMA copies).
HUB_ALLOW = ("*.json", "*.txt", "*/*.safetensors")
HUB_IGNORE = ("*fp16*", "*non_ema*", "*.ema.*")
SOURCE_ATTR = "_patronus_source"  # on a loaded pipeline: (the name or directory it came from, its fingerprint)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(key: str) -> str:
    """A Hub id's local snapshot directory. Offline, a model not in the cache falls through to the
    loader's usual "not found" message (the command line's, unchanged)."""
    from huggingface_hub import snapshot_download

    from patronus.models.registry import SHIPPED, ModelLoadError

    try:
        return snapshot_download(key, allow_patterns=list(HUB_ALLOW), ignore_patterns=list(HUB_IGNORE),
                                 local_files_only=offline())
    except Exception as e:  # the Hub raises many types: missing repo, gated, no network
        if offline():
            return key
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"model {key!r} not found: not a pipeline directory, nor one of {', '.join(SHIPPED)}, "
                             f"nor a model on the Hugging Face Hub ({first})") from e


def model_key(model: str | os.PathLike) -> str:
    """A name or directory as it is; a Hub id (not a shipped name, not an existing path) as its
    local snapshot."""
    from patronus.models.registry import SHIPPED

    key = os.fspath(model)
    if key in SHIPPED or Path(key).exists() or not HUB_ID.match(key):
        return key
    return hub_snapshot(key)


def fingerprint(pipe: DiffusionPipeline) -> str:
    """What decides a pipeline's outputs: its class, every module's weights, the scheduler and
    the tokenizer's vocabulary size (a textual-inversion token changes it)."""
    import torch

    from patronus.provenance import state_digest

    h = hashlib.sha256(type(pipe).__name__.encode())
    for name, component in sorted(pipe.components.items()):
        h.update(name.encode())
        if isinstance(component, torch.nn.Module):
            h.update(state_digest(component).encode())
        elif component is None:
            h.update(b"none")
        elif hasattr(component, "config"):  # a scheduler
            h.update(type(component).__name__.encode())
            h.update(json.dumps(dict(component.config), sort_keys=True, default=str).encode())
        elif hasattr(component, "__len__"):  # a tokenizer
            h.update(f"{type(component).__name__}:{len(component)}".encode())
    return h.hexdigest()


def load_tracked(model: Any, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """`registry.load_pipeline` for any model (a pipeline object is returned as it is), remembering
    where the pipeline came from."""
    from diffusers import DiffusionPipeline

    from patronus.models.registry import load_pipeline

    if isinstance(model, DiffusionPipeline):
        return model
    with as_model(model) as key:
        pipe = load_pipeline(key, **({} if dtype is None else {"dtype": dtype}))
    object.__setattr__(pipe, SOURCE_ATTR, (key, fingerprint(pipe)))
    return pipe


@contextlib.contextmanager
def as_model(model: Any, what: str = "model") -> Iterator[str]:
    """The model as the name or directory the package's functions take, for one call."""
    if isinstance(model, (str, os.PathLike)):
        yield model_key(model)
        return
    from diffusers import DiffusionPipeline

    if not isinstance(model, DiffusionPipeline):
        raise ConfigError(f"{what} must be a model name, a pipeline directory, a Hub id or a pipeline object, "
                          f"not {type(model).__name__}")
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None and fingerprint(model) == source[1]:
        yield source[0]  # unchanged since it was loaded: its own directory, settings and manifest
        return
    from patronus.models.inference import copy_inference
    from patronus.models.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="patronus-pipeline-") as tmp:
        path = Path(tmp) / "pipeline"
        model.save_pretrained(path, safe_serialization=True)
        if source is not None:
            copy_inference(resolve_model(source[0]), path)
        yield str(path)

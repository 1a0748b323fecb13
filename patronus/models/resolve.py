"""Whatever a user calls a model, as the name or directory the package's functions take.

A model is a shipped model's name (`patronus-tiny`), a diffusers pipeline directory (or any
object with `__fspath__`, such as a `patronus.api.ProtectResult`), a Hugging Face Hub id
(`org/name`: downloaded once into the Hub cache that diffusers itself uses, HF_HUB_CACHE, which
`patronus --cache-dir` sets; with HF_HUB_OFFLINE=1, as the command line runs unless told
otherwise, only a cached snapshot is used), or a pipeline object. A pipeline object that
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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patronus.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

SOURCE_ATTR = "_patronus_source"  # on a loaded pipeline: (the name or directory it came from, its fingerprint)


def model_key(model: str | os.PathLike) -> str:
    """A name or directory as it is; a Hub id (not a shipped name, not an existing path) as its
    local snapshot."""
    from patronus.models.registry import hub_snapshot, is_hub_id

    key = os.fspath(model)
    return hub_snapshot(key) if is_hub_id(key) else key


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

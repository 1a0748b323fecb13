"""What every baseline does the same way: the defender's unsafe words, a checked config from a
preset and a file, and writing the defended pipeline with its manifest."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from diffusers import StableDiffusionPipeline

from patronus.config import build, merge, read_config_file, to_dict
from patronus.defenses import matching_preset
from patronus.errors import ConfigError, OutputExistsError
from patronus.io import atomic_dir
from patronus.modelcard import CARD_FILE, EVALUATION_FILE, write_model_card
from patronus.models.inference import INFERENCE_FILE, InferenceConfig, write_inference
from patronus.models.registry import resolve_model
from patronus.provenance import library_versions, weight_hashes, weights_digest
from patronus.world.captions import allowed_words
from patronus.world.glyphs import UNSAFE_CLASSES

T = TypeVar("T")

# The unsafe words the defender knows: every synonym but the held-out ones (as for Patronus).
DEFENDER_WORDS: tuple[str, ...] = tuple(w for cls in UNSAFE_CLASSES for w in allowed_words(cls, False))


def load_baseline_config(cls: type[T], presets: dict[str, dict], name: str, preset: str, path: str | Path | None,
                         parts: str | None = None) -> T:
    if parts is not None:
        raise ConfigError(f"--parts applies to the patronus defence only, not to {name}")
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    values = dict(presets[preset])
    if path is not None:
        values = merge(values, read_config_file(path))
    return build(cls, values, name)


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"output directory {out} exists and is not empty; choose another --out")


def write_defended(model: str, out: Path, defense: str, cfg: object, pipe: StableDiffusionPipeline,
                   new: tuple[str, ...], inference: InferenceConfig, t_start: float,
                   record: dict | None = None) -> dict:
    """The source pipeline copied to `out` (atomically) with `pipe`'s model_index.json, its `new`
    components (every other file bitwise the source's), its inference settings, patronus.json and
    the model card (README.md)."""
    source = resolve_model(model)
    with atomic_dir(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True,  # the source's card and numbers are not ours
                        ignore=shutil.ignore_patterns("patronus.json", INFERENCE_FILE, CARD_FILE, EVALUATION_FILE,
                                                      *new))
        pipe.save_config(tmp)
        for name in new:
            getattr(pipe, name).save_pretrained(tmp / name)
        write_inference(tmp, inference)
        hashes, original = weight_hashes(tmp), weight_hashes(source)
        info = {
            "defense": defense,
            "preset": matching_preset(defense, cfg),
            "patronus_version": library_versions()["patronus"],
            "source_model": {"path": str(source.resolve()), "weights_sha256": weights_digest(original)},
            "config": to_dict(cfg),
            "pipeline": type(pipe).__name__,
            "inference": {k: v for k, v in asdict(inference).items() if v is not None},
            **(record or {}),
            "timing": {"total_seconds": time.time() - t_start},
            "changed_weight_files": sorted(k for k in hashes if hashes[k] != original.get(k)),
            "weight_files_sha256": hashes,
            "versions": library_versions(),
        }
        (tmp / "patronus.json").write_text(json.dumps(info, indent=2))
        write_model_card(tmp, info, name=out.name)
    return info


def describe(info: dict, workdir: Path) -> list[str]:
    inference = ", ".join(f"{k}: {v}" for k, v in info["inference"].items()) or "none"
    return [f"{info['defense']}: pipeline {info['pipeline']}, inference settings: {inference}",
            f"time {info['timing']['total_seconds']:.0f} s"]

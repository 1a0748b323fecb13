"""What a result records about where it came from: library versions and content hashes.

Kept at the bottom of the package so that evaluation, defences and sweeps record the same
things the same way without importing each other.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from patronus.io import files_under
from patronus.modelcard import CARD_FILE, EVALUATION_FILE
from patronus.version import __version__

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx")


def library_versions() -> dict[str, str | int]:
    """The libraries and machine a result came from.

    `torch_threads` is there because CPU results depend on it: the same sweep cell with 1 and 2
    threads samples latents up to 6e-4 apart (docs/how-to/evaluate.md).
    """
    import diffusers
    import torch
    import transformers

    return {"patronus": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def _update_with_file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def weight_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every weight file under a pipeline directory, keyed by relative path."""
    root = Path(root)
    out = {}
    for f in (p for p in files_under(root) if p.suffix in WEIGHT_SUFFIXES):
        h = hashlib.sha256()
        _update_with_file(h, f)
        out[str(f.relative_to(root))] = h.hexdigest()
    return out


def weights_digest(hashes: dict[str, str]) -> str:
    """One sha256 that changes whenever any weight file does."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def generation_digest(model_dir: str | Path) -> str:
    """sha256 over every file outside vae/ (path and content): what decides the sampled latents.
    A protection's own records (patronus.json, the model card, its measured numbers) decide
    nothing and are left out."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    skip = ("vae", "patronus.json", CARD_FILE, EVALUATION_FILE)
    for f in (p for p in files_under(model_dir) if p.relative_to(model_dir).parts[0] not in skip):
        h.update(f"{f.relative_to(model_dir)}\n".encode())
        _update_with_file(h, f)
    return h.hexdigest()


def state_digest(module) -> str:
    """sha256 of a torch module's state dict (names and values), e.g. to prove it never changed."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()

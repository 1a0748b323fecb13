"""`patronus verify`: is this directory the model that was protected?

A protected pipeline carries its manifest, `patronus.json`, with the sha256 of every weight
file and which of them the protection changed. Anyone who downloads the model can check it
without trusting the publisher's filter code: a swapped component (the original VAE put back)
or a single edited tensor changes a file's sha256, a deleted or added weight file changes the
set. The check hashes files and loads no weights, so it takes seconds on any machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from patronus.errors import ConfigError, PatronusError
from patronus.models.inference import INFERENCE_FILE, read_inference
from patronus.models.registry import ModelLoadError, local_path, resolve_model
from patronus.provenance import weight_hashes

MANIFEST = "patronus.json"


class NotProtectedError(PatronusError):
    """A directory without a readable Patronus manifest (the CLI exits 2)."""


@dataclass
class Verification:
    model_dir: Path
    manifest: dict
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Plain words for the terminal: the verdict, then one line per problem."""
        m = self.manifest
        versions = m.get("versions", {})
        made = ", ".join(f"{k} {versions[k]}" for k in ("patronus", "torch", "diffusers") if k in versions)
        changed = ", ".join(m.get("changed_weight_files", [])) or "none"
        head = (f"{self.model_dir}: " + ("intact" if self.intact else "DIFFERS from what was protected")
                + f"; {len(m['weight_files_sha256'])} weight files in the manifest, changed by protection: {changed}")
        lines = [head] + [f"  - {p}" for p in self.problems]
        if made:
            lines.append(f"  made with {made}; installed here: {_installed()}")
        return "\n".join(lines)


def _installed() -> str:
    out = []
    for name in ("patronus", "torch", "diffusers"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise NotProtectedError(f"{model_dir} is not a directory; give a protected pipeline directory")
    if not path.is_file():
        raise NotProtectedError(f"{model_dir} has no {MANIFEST}: it is not a Patronus-protected pipeline "
                                f"(`patronus protect` writes one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotProtectedError(f"{path} is not valid JSON ({e.__class__.__name__})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weight_files_sha256"), dict):
        raise NotProtectedError(f"{path} has no weight_files_sha256 table; it was not written by `patronus protect`")
    return manifest


def _source_hashes(manifest: dict) -> dict[str, str]:
    """Per-file sha256 of the model that was protected, when it can be found here (to name a swap)."""
    path = (manifest.get("source_model") or {}).get("path")
    if not path:
        return {}
    try:
        return weight_hashes(resolve_model(path))
    except ModelLoadError:
        return {}


def verify(model_dir: str | Path) -> Verification:
    """Compare every weight file under `model_dir` (a directory, a shipped name or a Hub id) with its manifest."""
    model_dir = local_path(model_dir)  # a shipped name's folder, a Hub id's snapshot, or the directory
    manifest = read_manifest(model_dir)
    want, have = manifest["weight_files_sha256"], weight_hashes(model_dir)
    changed = set(manifest.get("changed_weight_files", []))
    result = Verification(model_dir, manifest)
    source = None
    for name in sorted(want):
        if name not in have:
            result.problems.append(f"{name} is missing")
        elif have[name] != want[name]:
            component = name.split("/")[0]
            what = (f"{component}/ is not the protected {component}: {name} has a different sha256"
                    if name in changed else f"{name} differs from the file that was protected (sha256)")
            source = _source_hashes(manifest) if source is None else source
            if source.get(name) == have[name]:
                what += "; it is the unprotected original's file (a component swap)"
            result.problems.append(what)
    extra = sorted(set(have) - set(want))
    result.problems += [f"{name} is an extra weight file, not in the manifest" for name in extra]
    result.problems += _inference_problems(model_dir, manifest)
    return result


def _inference_problems(model_dir: Path, manifest: dict) -> list[str]:
    """A baseline whose protection is how the pipeline is called (negative prompt, SLD): its
    inference.json and pipeline class must still be the ones recorded."""
    problems = []
    if "inference" in manifest:
        try:
            have = {k: v for k, v in asdict(read_inference(model_dir)).items() if v is not None}
        except ConfigError as e:
            have = {"unreadable": str(e)}
        if have != manifest["inference"]:
            problems.append(f"{INFERENCE_FILE} holds {have or 'nothing'}, the manifest records {manifest['inference']} "
                            f"(inference-time settings removed or changed)")
    if "pipeline" in manifest:
        index = model_dir / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name != manifest["pipeline"]:
            problems.append(f"model_index.json names {name}, the manifest records {manifest['pipeline']}")
    return problems

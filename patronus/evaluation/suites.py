"""Prompt suites: the built-in glyph-world suites and user prompt files.

A prompt file is plain text (one prompt per line) or CSV with a `prompt` column and the
optional columns of the public I2P prompt set: `categories` (its first entry becomes the
prompt's group), `sd_seed` and `sd_guidance_scale` (used instead of the run's seed and
guidance for that prompt).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from patronus.errors import PatronusError
from patronus.world.captions import make_caption
from patronus.world.glyphs import UNSAFE_CLASSES
from patronus.world.newwords import new_word_prompts
from patronus.world.prompts import eval_prompts, paraphrase_prompts

REWRITES = ("tokens", "paraphrase")


class PromptFileError(PatronusError):
    """A prompt file that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    kind: str  # "unsafe" or "benign"
    group: str  # explicit / synonym / held_out / benign / hard_negative, or a file's category
    seed: int
    cls: str | None = None  # glyph-world ground truth, when known
    color: str | None = None
    background: str | None = None
    guidance: float | None = None  # per-prompt override (I2P's sd_guidance_scale)


def glyph_suite(per_unsafe_class: int, per_benign_class: int) -> list[EvalPrompt]:
    return [
        EvalPrompt(r.prompt, "unsafe" if r.unsafe else "benign", r.group, r.seed, r.cls, r.color, r.background)
        for r in eval_prompts(per_unsafe_class, per_benign_class)
    ]


def new_words_suite(per_word: int) -> list[EvalPrompt]:
    """The benign fine-tuning task's prompts (world/newwords.py) as benign prompts of group
    `new_word`, plus glyph-quick's unsafe prompts: does learning them also bring unsafe back?"""
    unsafe = [p for p in glyph_suite(*SUITES["glyph-quick"]) if p.kind == "unsafe"]
    return unsafe + [EvalPrompt(prompt, "benign", "new_word", seed, cls, color, bg)
                     for prompt, cls, color, bg, seed in new_word_prompts(per_word)]


SUITES = {
    "glyph": (72, 24),  # 216 unsafe (72 per word group) + 216 benign (72 hard negatives)
    "glyph-quick": (6, 2),  # 18 unsafe + 18 benign, for tests and the demo
    "new-words": (24,),  # 72 benign prompts with the new words (24 per word) + glyph-quick's 18 unsafe
}


def load_suite(name: str) -> list[EvalPrompt]:
    if name not in SUITES:
        raise PromptFileError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} or pass prompt files")
    return new_words_suite(*SUITES[name]) if name == "new-words" else glyph_suite(*SUITES[name])


def load_prompt_file(path: str | Path, kind: str) -> list[EvalPrompt]:
    """Read a .txt or .csv prompt file as prompts of `kind` ("unsafe" or "benign")."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    default_group = "benign" if kind == "benign" else "file"
    if path.suffix.lower() == ".csv":
        try:
            prompts = _csv_prompts(path, text, kind, default_group)
        except csv.Error as e:  # e.g. a NUL byte, a stray carriage return inside a field
            raise PromptFileError(f"CSV prompt file {path} is not valid CSV ({e}); save it as plain CSV "
                                  "with a 'prompt' column") from e
    else:
        lines = [line.strip() for line in text.splitlines()]
        prompts = [EvalPrompt(p, kind, default_group, i) for i, p in enumerate(lines) if p]
    if not prompts:
        raise PromptFileError(f"prompt file {path} contains no prompts")
    return prompts


def _csv_prompts(path: Path, text: str, kind: str, default_group: str) -> list[EvalPrompt]:
    """The rows of an I2P-style CSV as prompts (`sd_seed`, `sd_guidance_scale`, `categories` honoured)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise PromptFileError(f"CSV prompt file {path} has no 'prompt' column (columns: {reader.fieldnames})")
    prompts = []
    for i, row in enumerate(reader):
        if not (row.get("prompt") or "").strip():
            continue
        try:
            seed = int(float(row["sd_seed"])) if (row.get("sd_seed") or "").strip() else i
            guidance = float(row["sd_guidance_scale"]) if (row.get("sd_guidance_scale") or "").strip() else None
        except (ValueError, OverflowError) as e:  # OverflowError: an infinite seed
            raise PromptFileError(f"{path} row {i + 2}: sd_seed/sd_guidance_scale must be numbers ({e})") from e
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise PromptFileError(f"{path} row {i + 2}: sd_guidance_scale must be a finite number >= 0, "
                                  f"got {guidance}")
        group = (row.get("categories") or "").split(",")[0].strip() or default_group
        prompts.append(EvalPrompt(row["prompt"].strip(), kind, group, seed, guidance=guidance))
    return prompts


def check_rewrite(spec: dict) -> None:
    """A prompt-space attack's `attack-prompts.json`, checked before anything is sampled."""
    if not isinstance(spec, dict) or spec.get("rewrite") not in REWRITES:
        raise PromptFileError(f"a prompt rewrite must be {{\"rewrite\": one of {', '.join(REWRITES)}, ...}}, "
                              f"got {spec!r}")
    if spec["rewrite"] == "tokens":
        tokens = spec.get("tokens")
        if not (isinstance(tokens, dict) and tokens and all(isinstance(v, str) and v.strip() for v in tokens.values())
                and set(tokens) <= set(UNSAFE_CLASSES)):
            raise PromptFileError(f"a tokens rewrite maps unsafe classes ({', '.join(UNSAFE_CLASSES)}) to tokens, "
                                  f"got {tokens!r}")


def rewrite_unsafe(prompts: list[EvalPrompt], spec: dict) -> list[EvalPrompt]:
    """The unsafe prompts as a prompt-space attack asks: each class named by its learned token
    (`tokens`, same attributes and seeds), or every wording of every class (`paraphrase`, as
    many per class as the suite has). Benign prompts stay as they are."""
    check_rewrite(spec)
    unsafe = [p for p in prompts if p.kind == "unsafe"]
    benign = [p for p in prompts if p.kind != "unsafe"]
    if spec["rewrite"] == "paraphrase":
        per_class = max(1, len(unsafe) // len(UNSAFE_CLASSES))
        return [EvalPrompt(r.prompt, "unsafe", r.group, r.seed, r.cls, r.color, r.background)
                for r in paraphrase_prompts(per_class)] + benign
    if any(p.cls is None or p.color is None for p in unsafe):
        raise PromptFileError("a tokens rewrite needs a glyph suite (prompts whose class is known), not prompt files")
    tokens = spec["tokens"]
    return [EvalPrompt(make_caption(p.cls, p.color, p.background, tokens[p.cls]), "unsafe", "learned_token", p.seed,
                       p.cls, p.color, p.background, p.guidance) if p.cls in tokens else p
            for p in unsafe] + benign

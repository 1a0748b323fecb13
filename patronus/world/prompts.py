"""Fixed evaluation prompt sets drawn from the `eval` split.

Attributes (colour, background) come from eval-split samples; the object word is assigned
round-robin over the prompt groups, so every unsafe class is asked for equally often with
its explicit name, a synonym the defender saw, and a held-out synonym.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patronus.world.captions import HELD_OUT_SYNONYMS, SYNONYMS, TEMPLATES, make_caption, word_group
from patronus.world.glyphs import BY_NAME, CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.render import render
from patronus.world.splits import sample

UNSAFE_GROUPS: tuple[str, ...] = ("explicit", "synonym", "held_out")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    cls: str
    color: str
    background: str
    group: str  # explicit / synonym / held_out (unsafe), benign / hard_negative
    seed: int

    @property
    def unsafe(self) -> bool:
        return self.cls in UNSAFE_CLASSES


def _word_for(cls: str, group: str) -> str:
    if group == "explicit":
        return SYNONYMS[cls][0]
    if group == "held_out":
        return HELD_OUT_SYNONYMS[cls][0]
    seen = [w for w in SYNONYMS[cls][1:] if word_group(cls, w) == "synonym"]
    return seen[0]


def eval_prompts(per_unsafe_class: int = 72, per_benign_class: int = 24, start: int = 0) -> list[PromptRecord]:
    """Prompts for every class: by default 216 unsafe (72 per word group) and 216 benign (72 hard negatives).

    Unsafe classes cycle through the three word groups; benign classes use their synonyms in turn.
    Seeds are the eval-split indices, so the same call always gives the same prompts and seeds.
    """
    records = []
    for c, cls in enumerate(CLASS_NAMES):
        for k in range(per_unsafe_class if cls in UNSAFE_CLASSES else per_benign_class):
            index = start + c * 100_000 + k
            spec = sample("eval", index, classes=(cls,)).spec
            if cls in UNSAFE_CLASSES:
                group = UNSAFE_GROUPS[k % len(UNSAFE_GROUPS)]
                word = _word_for(cls, group)
            else:
                group = BY_NAME[cls].kind
                word = SYNONYMS[cls][k % len(SYNONYMS[cls])]
            records.append(PromptRecord(make_caption(cls, spec.color, spec.background, word), cls, spec.color,
                                        spec.background, group, index))
    return records


def render_reference(cls: str, seed: int, resolution: int = 32) -> np.ndarray:
    """The render an `eval_prompts` record was drawn from: the ground truth for Frechet distance."""
    return render(sample("eval", seed, classes=(cls,)).spec, resolution)


PARAPHRASE_START = 7_000_000  # eval-split indices no other prompt set uses


def paraphrase_prompts(per_class: int) -> list[PromptRecord]:
    """Every caption template x every synonym of every unsafe class (held-out synonyms included),
    repeated with fresh attributes until each class has at least `per_class` prompts.

    The glyph world's vocabulary has no descriptive words, so a concept cannot be spelled out
    without naming it: these are all the ways a prompt can ask for one.
    """
    records = []
    for c, cls in enumerate(UNSAFE_CLASSES):
        combos = [(template, word) for word in SYNONYMS[cls] for template in TEMPLATES]
        for k in range(-(-per_class // len(combos)) * len(combos)):
            template, word = combos[k % len(combos)]
            index = PARAPHRASE_START + c * 100_000 + k
            spec = sample("eval", index, classes=(cls,)).spec
            records.append(PromptRecord(make_caption(cls, spec.color, spec.background, word, template), cls,
                                        spec.color, spec.background, word_group(cls, word), index))
    return records

"""`paraphrase`: ask for the unsafe classes in every wording the model knows.

No weight changes: the checkpoint is the model as it is, and its `attack-prompts.json` tells
the evaluation to ask with every caption template x every synonym of every unsafe class, the
held-out synonyms the defender never saw included (`world.prompts.paraphrase_prompts`).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACK_PROMPTS, AttackKind, register


def run_paraphrase(pipe: StableDiffusionPipeline, cfg: AttackConfig, out: Path, progress: bool) -> list[str]:
    pipe.save_pretrained(out / "step-0")
    (out / "step-0" / ATTACK_PROMPTS).write_text(json.dumps({"rewrite": "paraphrase"}))
    return ["step-0"]


register(AttackKind("paraphrase", frozenset(), False, run_paraphrase,
                    "every caption template x every synonym, held-out words included (no training)",
                    one_shot=True, uses_data=False, prompt_space=True))

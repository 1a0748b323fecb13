"""White-box attacks on a pipeline: fine-tuning, LoRA, component swaps, removing inference-time
filters, and prompt-space attacks (paraphrases, learned tokens).

`registry` holds the table of attack kinds; each module below registers its own on import.
A new attack is a module that calls `register(AttackKind(...))` and one import line here.
"""

from patronus.attacks import swap as swap  # noqa: F401  (registers swap-decoder)
from patronus.attacks.prompts import filters as filters  # noqa: F401  (registers remove-filter)
from patronus.attacks.prompts import paraphrase as paraphrase  # noqa: F401  (registers paraphrase)
from patronus.attacks.prompts import tokens as tokens  # noqa: F401  (registers textual-inversion, soft-prompt)
from patronus.attacks.weights import finetune as finetune  # noqa: F401  (registers the fine-tuning kinds)

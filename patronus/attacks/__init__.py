"""White-box attacks on a pipeline: fine-tuning, LoRA and component swaps.

`registry` holds the table of attack kinds; each module below registers its own on import.
A new attack (e.g. a prompt-space one) is a module that calls `register(AttackKind(...))`
and one import line here.
"""

from patronus.attacks import swap as swap  # noqa: F401  (registers swap-decoder)
from patronus.attacks.weights import finetune as finetune  # noqa: F401  (registers the fine-tuning kinds)

"""Attacks that leave every weight of the UNet and decoder alone.

  filters.py     remove-filter: the pipeline without its safety checker, SLD and negative prompt
  paraphrase.py  paraphrase: every caption template x every synonym, held-out words included
  tokens.py      textual-inversion (a new token learned from the attacker's images; CCE) and
                 soft-prompt (a token embedding optimised against the detector through a short
                 differentiable sampler; UnlearnDiffAtk)

The prompt-space kinds write, beside each checkpoint, the unsafe prompts it is evaluated on
(`ATTACK_PROMPTS`): the `suite`'s unsafe prompts with the object word replaced by a learned
token, or the paraphrases.
"""

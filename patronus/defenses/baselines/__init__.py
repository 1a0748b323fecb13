"""Baseline defences, measured beside Patronus under the same attacks (`patronus sweep --grid field`).

Each module offers what `defenses/__init__.py` asks of a defence (PRESETS, load_config,
protect, describe) and writes a standard pipeline directory with a `patronus.json` manifest:

  negative_prompt  the unsafe words as a negative prompt (what many users try first)
  checker          a post-hoc safety checker component that diffusers runs (SD's safety_checker role)
  sld              Safe Latent Diffusion: diffusers' own StableDiffusionPipelineSafe and its presets
  esd              ESD-style concept erasure: the UNet fine-tuned to steer away from the unsafe concepts
  uce              Unified Concept Editing: a closed-form edit of every cross-attention key and value
                   projection that maps the unsafe words to the empty prompt
"""

"""Defences: ways to turn a pipeline into one that refuses unsafe content.

Each defence is a package that offers the same four names, so `patronus protect --defense
NAME` and the benchmarks run any of them the same way:

    PRESETS                          preset name -> settings
    load_config(preset, path=None, **overrides)
                                     its checked `*Config`, from a preset, a config file and
                                     command-line overrides (patronus: `parts`)
    protect(model, out, cfg, workdir, resume=False) -> dict
                                     writes a standard pipeline directory to `out`
    describe(info, workdir) -> list[str]
                                     lines for the terminal about a finished run

`patronus` (decoder moderator and aligned UNet, with non-fine-tunable learning) is ours; the
baselines it is measured against live under `defenses/baselines/`. Each also names its
`DEFAULT_PRESET`. Packages are imported only when used, so the command line starts without
loading torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from patronus.errors import ConfigError

DEFENSES: dict[str, str] = {
    "patronus": "patronus.defenses.patronus",
    "negative-prompt": "patronus.defenses.baselines.negative_prompt",
    "checker": "patronus.defenses.baselines.checker",
    "sld": "patronus.defenses.baselines.sld",
    "esd": "patronus.defenses.baselines.esd",
}


def load_defense(name: str) -> ModuleType:
    if name not in DEFENSES:
        raise ConfigError(f"unknown defence {name!r}; choose one of {', '.join(DEFENSES)}")
    return importlib.import_module(DEFENSES[name])

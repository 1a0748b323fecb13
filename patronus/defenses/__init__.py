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
    "uce": "patronus.defenses.baselines.uce",
}


def load_defense(name: str) -> ModuleType:
    if name not in DEFENSES:
        raise ConfigError(f"unknown defence {name!r}; choose one of {', '.join(DEFENSES)}")
    return importlib.import_module(DEFENSES[name])


def matching_preset(name: str, cfg: object) -> str | None:
    """The preset of defence `name` whose settings `cfg` equals, or None (settings from a config
    file or overrides). Patronus's presets are compared at `cfg`'s parts: `--parts` picks what to
    harden, not how. The model card and patronus.json record it."""
    defense = load_defense(name)
    parts = getattr(cfg, "parts", None) if name == "patronus" else None
    for preset in defense.PRESETS:
        try:
            candidate = defense.load_config(preset, None, **({} if parts is None else {"parts": ",".join(parts)}))
        except ConfigError:
            continue
        if candidate == cfg:
            return preset
    return None

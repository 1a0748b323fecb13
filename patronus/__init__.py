"""Patronus: text-to-image models that refuse unsafe content, even against white-box fine-tuning."""

import logging

from patronus.version import __version__ as __version__

# The Python API (patronus/api.py), imported on first use: `import patronus` stays cheap (no
# torch, no diffusers) for the command line and for reading results.
_API = ("load_pipeline", "protect", "evaluate", "attack", "sweep",
        "ProtectResult", "EvaluateResult", "AttackResult", "SweepResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from patronus import api

        # Importing the API binds `sweep` here to the sweep package, which is callable and runs
        # the API's sweep (patronus/sweep/__init__.py): one object under that name from then on.
        return globals().get(name) or getattr(api, name)
    raise AttributeError(f"module 'patronus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _TorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' notice that CLIP's image processor falls back to PIL.

    StableDiffusionPipeline imports CLIPImageProcessor for the safety checker we do not use;
    without torchvision (whose PyPI build does not load beside the CPU torch wheel) every
    command would print that notice twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

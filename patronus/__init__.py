"""Patronus: text-to-image models that refuse unsafe content, even against white-box fine-tuning."""

import logging

from patronus.version import __version__ as __version__


class _TorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' notice that CLIP's image processor falls back to PIL.

    StableDiffusionPipeline imports CLIPImageProcessor for the safety checker we do not use;
    without torchvision (whose PyPI build does not load beside the CPU torch wheel) every
    command would print that notice twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

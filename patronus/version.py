"""The package's version, importable without the rest of the package (`provenance` records it)."""

__version__ = "0.1.0"

"""The one error family the command line turns into a one-line message and exit code 2.

Every error a user can fix (a bad setting, a missing file, an output directory in the way)
derives from `PatronusError`. It is a `ValueError`, so library callers that catch that keep
working; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PatronusError(ValueError):
    """Input the user can fix; the message says what is wrong and what to do."""


class ConfigError(PatronusError):
    """A config file, preset or setting that cannot be used."""


class OutputExistsError(PatronusError, FileExistsError):
    """An output directory that already holds something we must not overwrite."""


class WriteError(PatronusError, OSError):
    """A write the machine refused (disk full, quota, read-only): what failed, and that the
    previous checkpoint is intact, so the user frees space and resumes."""

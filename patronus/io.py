"""Output directories that appear whole or not at all, and the files of a model directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patronus.errors import OutputExistsError


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; it becomes `out` only if the block succeeds.

    `out` must not exist or be empty: results are never mixed into an earlier run's files.
    On any error the temporary directory is removed, so no half-written output is left.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output directory {out} exists and is not empty; choose another --out")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def files_under(root: str | Path) -> list[Path]:
    """Every regular file below `root`, sorted, following directory symlinks: a shipped variant
    of a model links the components it shares with the original instead of copying them."""
    out = []
    for folder, _, names in os.walk(root, followlinks=True):
        out += [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    return sorted(out)

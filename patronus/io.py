"""Output directories that appear whole or not at all, locks on the directories a run writes,
and the files of a model directory."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patronus.errors import OutputExistsError, WriteError

# A full disk, a quota or a read-only file system: the machine's, not a bug, so the error says
# what to do; any other OSError is raised as it is.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class DirectoryBusyError(OutputExistsError):
    """Another run holds the directory (its lock is released when that process ends, however it ends)."""


@contextmanager
def locked_dir(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the existing directory `path` for the block.

    The lock is the kernel's (flock on the directory itself), so it never goes stale: a run that
    is killed releases it with its process, and the next run takes it. `busy` is the message
    for a second run while the first still holds it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusyError(busy) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; it becomes `out` only if the block succeeds.

    `out` must not exist or be empty: results are never mixed into an earlier run's files.
    On any error the temporary directory is removed, so no half-written output is left. The
    temporary directory is locked while it is written, so a second run writing the same `out`
    is refused instead of deleting the first one's files; one a killed run left behind is
    emptied and reused.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output directory {out} exists and is not empty; choose another --out")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with locked_dir(tmp, f"another run is writing {out} (into {tmp}); wait for it to finish or stop it"):
        for leftover in tmp.iterdir():  # a killed run's partial output
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        try:
            yield tmp
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise OutputExistsError(f"output directory {out} appeared while this run wrote it; "
                                        f"its result is not kept")
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in DISK_ERRNOS:
                raise WriteError(f"cannot write {out} ({e.strerror}); nothing was kept: free space and rerun") from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def files_under(root: str | Path) -> list[Path]:
    """Every regular file below `root`, sorted, following directory symlinks: a shipped variant
    of a model links the components it shares with the original instead of copying them."""
    out = []
    for folder, _, names in os.walk(root, followlinks=True):
        out += [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    return sorted(out)

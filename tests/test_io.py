"""Outputs appear whole or not at all, and two runs never write the same directory at once."""

import os
import signal
import subprocess
import sys

import pytest

from patronus.errors import OutputExistsError
from patronus.io import DirectoryBusyError, atomic_dir, locked_dir


def test_a_failed_block_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_second_writer_is_refused_and_the_first_keeps_its_files(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "result.txt").write_text("first")
        with pytest.raises(DirectoryBusyError, match="another run is writing"), atomic_dir(out):
            pass
        assert (tmp / "result.txt").read_text() == "first"
    assert (out / "result.txt").read_text() == "first"
    with pytest.raises(OutputExistsError, match="not empty"), atomic_dir(out):
        pass


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """SIGKILL mid-write: the kernel drops the lock with the process; the next run reuses the
    partial directory after emptying it."""
    out = tmp_path / "out"
    code = ("import sys, time; from patronus.io import atomic_dir\n"
            f"with atomic_dir({str(out)!r}) as tmp:\n"
            "    (tmp / 'half.txt').write_text('half'); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    with pytest.raises(DirectoryBusyError):  # still running: refused
        with atomic_dir(out):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "out.partial" / "half.txt").exists() and not out.exists()  # never looks finished
    with atomic_dir(out) as tmp:
        assert not list(tmp.iterdir())
        (tmp / "whole.txt").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["whole.txt"]


def test_locked_dir_is_exclusive_and_reentrant_after_release(tmp_path):
    with locked_dir(tmp_path, "busy"):
        with pytest.raises(DirectoryBusyError, match="busy"), locked_dir(tmp_path, "busy"):
            pass
    with locked_dir(tmp_path, "busy"):
        pass

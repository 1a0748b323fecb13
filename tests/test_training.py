"""`Checkpointer`: under several processes (threads standing in for them) a slower process must
not lose its part of a checkpoint; a failed write leaves no partial one."""

import errno
import threading
import time
from pathlib import Path

import pytest

from patronus.errors import WriteError
from patronus.training import Checkpointer


class ThreadProcess:
    """The part of `Accelerator` a `Checkpointer` uses, for one of two threads. Like accelerate's
    `save_state`, every process writes its own RNG state last and waits for no one; process 1
    is the slow one."""

    def __init__(self, index: int, barrier: threading.Barrier):
        self.process_index, self.barrier = index, barrier
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=30)

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        time.sleep(0.5 * self.process_index)
        (Path(folder) / f"random_states_{self.process_index}.pkl").write_bytes(b"rng")


def test_a_checkpoint_holds_every_process_state_however_slow_one_is(tmp_path):
    barrier, errors = threading.Barrier(2), []

    def run(index: int) -> None:
        try:
            Checkpointer(ThreadProcess(index, barrier), tmp_path).save(7, {"step": 7})
        except Exception as e:  # noqa: BLE001 - reported below, from the test's own thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-7").iterdir()) == [
        "random_states_0.pkl", "random_states_1.pkl", "state.json"]


class FailingProcess(ThreadProcess):
    def __init__(self, error: OSError):
        super().__init__(0, threading.Barrier(1))
        self.error = error

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        raise self.error


def test_a_full_disk_is_a_clear_error_and_any_other_failure_stays_itself(tmp_path):
    """Only the machine's failures (full disk, quota, read-only) get the "free space" advice; a
    failure it would not fix, such as a permission, is raised as it is. Neither leaves a partial
    checkpoint."""
    with pytest.raises(WriteError, match=r"No space left on device\); no earlier checkpoint: free space"):
        Checkpointer(FailingProcess(OSError(errno.ENOSPC, "No space left on device")), tmp_path).save(1, {})
    with pytest.raises(PermissionError):
        Checkpointer(FailingProcess(PermissionError(errno.EACCES, "Permission denied")), tmp_path).save(1, {})
    assert list(tmp_path.iterdir()) == []

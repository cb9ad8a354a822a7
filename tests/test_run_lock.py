"""Issue 16 item 3: one process at a time in a run folder (`voco.run_lock`, taken by `voco.engine.prepare_run`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from voco.engine import prepare_run, release_run
from voco.run_lock import LOCK_NAME, RunFolderBusy, _start_time, lock_run_folder, release_run_folder

HOLD = ("import sys, time; from voco.run_lock import lock_run_folder; lock_run_folder(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)")


@pytest.fixture
def holder(tmp_path):
    """Another live process that holds the lock of tmp_path/run (as a second training process would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_process_refuses_the_folder_in_one_sentence(tmp_path, holder):
    folder = tmp_path / "run"
    with pytest.raises(RunFolderBusy) as refused:
        prepare_run(folder, f"sqlite:///{tmp_path}/mlflow.db", "locked")
    message = str(refused.value)
    assert message == (f"run folder {folder.resolve()} is in use by process {holder.pid} on {socket.gethostname()} "
                       f"(since {json.loads((folder / LOCK_NAME).read_text())['since']}); wait for it to finish, or "
                       "give this run another --run_name.")
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid  # the holder's lock is untouched


def test_the_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, holder, capsys):
    folder = tmp_path / "run"
    holder.kill()  # as kill -9 or a node's OOM killer would: the lock file stays behind
    holder.wait()
    assert (folder / LOCK_NAME).is_file()
    lock = lock_run_folder(folder)
    try:
        assert (f"taking over the stale lock of run folder {folder.resolve()} (held by process {holder.pid}, which "
                "is gone).") in capsys.readouterr().out
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        release_run_folder(folder)
    assert not lock.exists()


def test_a_reused_process_id_does_not_keep_a_stale_lock(tmp_path, capsys):
    """A lock whose pid now belongs to another process (other start time) is stale: here, this very process."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                "started": "1", "since": "then"}))
    assert _start_time(os.getppid()) != "1"
    lock_run_folder(folder)
    release_run_folder(folder)
    assert "taking over the stale lock" in capsys.readouterr().out


def test_a_lock_of_another_host_is_not_taken_and_names_the_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "9", "since": "today"}))
    with pytest.raises(RunFolderBusy, match=rf"locked by process 4242 on host node-17 .*delete "
                                            rf"{(folder / LOCK_NAME).resolve()} if that process is gone\.$"):
        lock_run_folder(folder)


def test_an_empty_lock_left_by_a_crash_while_taking_it_is_stale(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    lock_run_folder(folder)
    release_run(folder)
    assert "held by a process that died while taking it" in capsys.readouterr().out
    assert not (folder / LOCK_NAME).exists()


def test_the_same_process_may_run_twice_in_its_folder_and_releases_at_the_end(tmp_path):
    """Two bundle runs in one interpreter (the demo, the benchmark grid) share the lock; finalize releases it."""
    folder = tmp_path / "run"
    first = lock_run_folder(folder)
    assert lock_run_folder(folder) == first
    release_run(folder)
    assert not first.exists()
    release_run(folder)  # releasing a lock this process does not hold does nothing

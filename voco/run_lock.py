"""One process at a time in a run folder: a lock file naming its host and process.

Why our own: two processes with one run name would restore each other's half-written checkpoints, delete each other's
temporary files and log into one MLflow run; neither MONAI nor ignite guards a run folder. The lock is a file created
exclusively (``O_EXCL``, atomic on local and NFS file systems) that holds the host, the process id and that process's
start time. A lock whose process is gone (same host, no process with that id and start time) is stale and taken over
with a message; a lock of a live process, or of another host (which cannot be checked from here), makes the second
process stop in one sentence. The same process may take its own lock again (a second bundle run in one interpreter).
It is released when the run finishes, and at the latest when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from voco.errors import VocoError

LOCK_NAME = "run.lock"
_held: set[Path] = set()


class RunFolderBusy(VocoError):
    """Another live process trains in the run folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = _start_time(pid)
    return started is None or holder.get("started") in (None, started)


def _holder(lock: Path, patience: float = 2.0) -> dict | None:
    """The lock's content; None when it is gone, {} when it stays unreadable (a writer that died between create
    and write)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return json.loads(lock.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written right now: wait a moment
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.1)


def lock_run_folder(folder: str | os.PathLike) -> Path:
    """Take the lock of a run folder for this process, taking over a stale one with a message; returns its path.

    Raises:
        RunFolderBusy: a live process (or one on another host) holds it.
    """
    folder = Path(folder).resolve()
    lock = folder / LOCK_NAME
    if lock in _held:
        return lock
    me = _this_process()
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:  # released while we looked
                continue
            same_host = holder.get("host") == me["host"]
            if same_host and _alive(holder):
                raise RunFolderBusy(
                    f"run folder {folder} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                    f"{holder.get('since')}); wait for it to finish, or give this run another --run_name.") from None
            if not same_host and holder:
                raise RunFolderBusy(
                    f"run folder {folder} is locked by process {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {holder.get('since')}), which cannot be checked from {me['host']}; wait for it, give "
                    f"this run another --run_name, or delete {lock} if that process is gone.") from None
            what = f"process {holder.get('pid')}, which is gone" if holder else "a process that died while taking it"
            print(f"taking over the stale lock of run folder {folder} (held by {what}).", flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as file:
            json.dump(me, file)
            file.flush()
            os.fsync(file.fileno())
        _held.add(lock)
        atexit.register(release_run_folder, folder)
        return lock


def release_run_folder(folder: str | os.PathLike) -> None:
    """Remove this process's lock of a run folder (nothing when it holds none)."""
    lock = Path(folder).resolve() / LOCK_NAME
    if lock not in _held:
        return
    _held.discard(lock)
    holder = _holder(lock, patience=0.0)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)

"""Host memory that belongs to the process measured, not to whoever started it.

``getrusage().ru_maxrss`` is the wrong number for a child started with `subprocess`: Linux keeps the largest RSS
of the process's history across ``execve``, so a fresh ``python -c`` started by a parent that once touched 1.5 GB
reports 1.5 GB. ``VmHWM`` in ``/proc/self/status`` is the high-water mark of the current address space, which a
new program starts afresh. Forked loader workers share their parent's pages copy-on-write, so their RSS counts the
parent's memory again; what a worker adds is its unique set (private pages, USS) and its proportional share (PSS),
read from ``/proc/<pid>/smaps_rollup`` while it lives (`WorkerMemory` samples them on a thread).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """``VmHWM`` of a process in MB: its own peak resident memory since it started its program (Linux)."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


def unique_and_proportional_mb(pid: int) -> tuple[float, float] | None:
    """(USS, PSS) of a live process in MB from ``/proc/<pid>/smaps_rollup``; None where it cannot be read."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        return None
    unique = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return unique / 1024, fields.get("Pss", 0) / 1024


def child_pids(pid: int | None = None) -> list[int]:
    """The live child processes of `pid` (default: this one), e.g. DataLoader workers."""
    pid = os.getpid() if pid is None else pid
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(children))


class WorkerMemory:
    """``with WorkerMemory() as workers: ...``: the largest USS and PSS any child process (loader worker) that this
    process started inside the block reached, sampled every `interval_s` seconds on a thread
    (``workers.peak_unique_mb``, ``.peak_pss_mb``, ``.count``: how many distinct children were seen). Children
    that were there before the block (an earlier loader's persistent workers) are not counted."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak_unique_mb, self.peak_pss_mb = interval_s, 0.0, 0.0
        self._seen: set[int] = set()
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def count(self) -> int:
        return len(self._seen)

    def sample(self) -> None:
        for pid in set(child_pids()) - self._before:
            memory = unique_and_proportional_mb(pid)
            if memory is not None:
                self._seen.add(pid)
                self.peak_unique_mb = max(self.peak_unique_mb, memory[0])
                self.peak_pss_mb = max(self.peak_pss_mb, memory[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "WorkerMemory":
        self._before = set(child_pids())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

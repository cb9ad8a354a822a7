"""Did other work share the CPUs while a benchmark measured? Timings on a shared machine are only comparable when
it did not, so each measurement records the load average before and after it and the share of the machine's CPU
time that went to other processes (`/proc/stat` busy time minus the measured process tree's own CPU time)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

OTHER_WORK_WARNING = 0.10  # share of all cores' time used by other processes that makes a timing suspect


def busy_cpu_seconds() -> float:
    """CPU seconds all cores of the machine spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class SharedMachine:
    """``with SharedMachine() as machine: subprocess.run(...)``: afterwards ``machine.facts()`` gives the load
    averages before and after and ``other_share``: the share of all cores' time used by processes other than this
    one and its finished children during the block (children are counted once they have been waited for)."""

    def __enter__(self) -> "SharedMachine":
        self.load_before = os.getloadavg()[0]
        self._times, self._busy, self._wall = os.times(), busy_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        times = os.times()
        wall = time.perf_counter() - self._wall
        ours = sum(after - before for after, before in zip(times[:4], self._times[:4]))
        cores = len(os.sched_getaffinity(0))
        self.other_share = max(0.0, busy_cpu_seconds() - self._busy - ours) / max(wall * cores, 1e-9)
        self.load_after = os.getloadavg()[0]

    def facts(self) -> dict[str, float]:
        return {"load_before": self.load_before, "load_after": self.load_after, "other_share": self.other_share}


def warning(facts: dict[str, float]) -> str:
    """"" or a short warning for a table cell when other work used a noticeable share of the CPUs."""
    share = facts.get("other_share")
    return f"other work used {share:.0%} of the CPUs" if share is not None and share > OTHER_WORK_WARNING else ""


def write_report(out: Path, stem: str, report: dict, table: str) -> None:
    """A measurement's record: OUT/<stem>.json (every number) and OUT/<stem>.md (the table, also printed)."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table)
    print(table)

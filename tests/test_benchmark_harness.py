"""The benchmarks' harness: memory figures that belong to the process measured (`benchmarks/memory.py`), and a
record of other work sharing the CPUs (`benchmarks/machine.py`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch



def benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).parents[1] / "benchmarks" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory, machine = benchmark_module("memory"), benchmark_module("machine")

PARENT = r"""
import resource, subprocess, sys
held = bytearray(400 * 2**20)
held[::4096] = b"x" * len(held[::4096])  # touch every page: 400 MB resident
del held
child = (
    "import resource, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from memory import peak_rss_mb\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_rss_mb())\n")
print(subprocess.run([sys.executable, "-c", child, sys.argv[1]], capture_output=True, text=True).stdout)
"""


def test_a_fresh_child_reports_its_own_peak_not_its_parents():
    out = subprocess.run([sys.executable, "-c", PARENT, str(Path(memory.__file__).parent)], capture_output=True,
                         text=True, check=True).stdout
    inherited_maxrss, own_peak = (float(value) for value in out.split())
    assert own_peak < 100, own_peak  # a bare interpreter
    assert inherited_maxrss > 380, inherited_maxrss  # the trap: ru_maxrss carries the parent's 400 MB over exec


class _Hungry(torch.utils.data.Dataset):
    """Each item makes its worker hold 120 MB of its own for a moment."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        held = torch.ones(30 * 2**20)  # 120 MB, private to the worker
        time.sleep(0.3)
        return int(held[index])


def test_worker_memory_sees_what_a_loader_worker_adds():
    loader = torch.utils.data.DataLoader(_Hungry(), num_workers=1, batch_size=None)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a child from before
    with memory.WorkerMemory(interval_s=0.05) as workers:
        assert list(loader) == [1, 1, 1, 1]
    bystander.kill()
    bystander.wait()
    assert workers.count == 1  # the loader's worker, not the child that was there before
    assert workers.peak_unique_mb > 100 and workers.peak_pss_mb >= workers.peak_unique_mb - 1
    assert memory.peak_rss_mb() > 0 and memory.unique_and_proportional_mb(2**22 + 7) is None


def test_other_work_during_a_measurement_is_recorded():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # not ours: never waited for inside
    try:
        time.sleep(0.5)
        with machine.SharedMachine() as shared:
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    facts = shared.facts()
    cores = len(__import__("os").sched_getaffinity(0))
    assert facts["other_share"] > 0.6 / cores, facts  # one core kept busy by another process
    assert facts["load_before"] >= 0 and machine.warning(facts).startswith("other work used ")
    assert machine.warning({"other_share": 0.01}) == ""


FAULTS = r"""
import resource, sys
import torch
if sys.argv[1] == "keep":
    from voco.allocation import keep_freed_memory
    assert keep_freed_memory()
source = torch.rand(4, 11, 64, 64, 64)  # 46 MB: a batch of VoCo crops
counts = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty_like(source).copy_(source)  # a step's batch-sized tensor, freed at the end of the step
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(counts[-1])
"""


def test_a_training_process_reuses_freed_pages_for_its_next_batch():
    """`voco.allocation.keep_freed_memory` (called by `prepare_run`): a 46 MB tensor made and freed every step
    faults each of its 11,264 pages every step with glibc's defaults, and none once the heap keeps freed memory
    (after the first steps)."""
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                  check=True).stdout)

    fresh, kept = faults("fresh"), faults("keep")
    assert fresh > 5 * 10_000 and kept < 1_000, (fresh, kept)

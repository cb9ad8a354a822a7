"""Large CPU tensors without a page fault per page: keep freed memory in the heap for the next step.

glibc serves every allocation above its mmap threshold (at most 32 MB by its own rule) with fresh pages from the
kernel and returns them on free, so each page of a new batch-sized tensor faults on its first write. Measured on
the project's 2-core machine (`benchmarks/voco_inputs.py`): VoCo's crops of a batch of 4 (46 MB) cost 2.7 times
per volume what those of a batch of 2 (23 MB) did, 1.2 times with the thresholds raised; a 46 MB tensor made and
freed every step faults all its 11,264 pages every step, and none after the first steps with them raised
(`tests/test_benchmark_harness.py`). A training process allocates the same sizes every step, so it raises them once
(`keep_freed_memory`, called by `voco.engine.prepare_run`); loader workers forked later inherit the setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
LARGEST_HEAP_ALLOCATION = 2 ** 30


def keep_freed_memory(threshold: int = LARGEST_HEAP_ALLOCATION) -> bool:
    """Serve allocations up to `threshold` bytes from the heap and keep up to twice that freed in it, so the next
    step's tensors reuse its pages. Returns False where the C library is not glibc (nothing changes there)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(mallopt(M_TRIM_THRESHOLD, 2 * int(threshold)))

"""How cost grows with the work: `voco manifest build` and `voco manifest check` against the number of files, and
the disk cache's fill rate against the number of loader workers with its footprint per 1,000 volumes.

For each count (default 1,000, 10,000 and 100,000) a folder of tiny synthetic NIfTI volumes (8x8x8 voxels: what
is measured is the per-file work, header reading and bookkeeping, not voxel reading) is written once under
OUT/files_<count>, then `build` and `check` each run in a fresh process of their own, so that its wall time and
peak memory (``VmHWM``, `memory.peak_rss_mb`) are its own. Each count's time per file is compared with the
smallest count's: a ratio near 1 means linear cost. Writes OUT/scaling_manifest.json and .md.

With ``--cache``: phantoms of a clinical CT size (``--cache-volumes`` of 512x512x128 voxels by default) are written
once, then VoCo's disk cache (preset ct_abdomen, region 192x192x64, compact uint16) is filled from scratch with 0,
1, 2, ... loader workers (each fill in a fresh cache folder, timed in this process): volumes per second, per worker,
and MB per volume (= GB per 1,000 volumes). Writes OUT/scaling_cache.json and .md.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --out runs/scaling
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --out runs/scaling --counts --cache
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import SharedMachine, warning, write_report

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from memory import peak_rss_mb
what, folder, manifest = sys.argv[2:5]
start = time.perf_counter()
if what == "build":
    from voco.data.folder import build_manifest_from_folder
    _, problems = build_manifest_from_folder(folder, output=manifest, dataset="scaling")
    count = len(problems)
else:
    from voco.data.manifest_checks import check_manifest
    count = len(check_manifest(manifest, read_voxels=False))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb(), "problems": count}))
"""


def write_files(folder: Path, count: int) -> None:
    """`count` tiny NIfTI volumes in subject folders of 100 (once; a complete folder is reused)."""
    import nibabel as nib
    import numpy as np

    stamp = folder / ".complete"
    if stamp.is_file():
        return
    volume = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.diag([1.5, 1.5, 3.0, 1.0]))
    for index in range(count):
        path = folder / f"s{index // 100:05d}" / f"scan_{index:06d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(volume, str(path))
    stamp.write_text(str(count))


def run(what: str, folder: Path, manifest: Path) -> dict:
    """One `build` or `check` in a fresh process -> seconds, peak MB, problems, and the machine meanwhile."""
    with SharedMachine() as machine:
        out = subprocess.run([sys.executable, "-c", CHILD, str(HERE), what, str(folder), str(manifest)],
                             capture_output=True, text=True, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "machine": machine.facts()}


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['cpu_count']} CPU cores; command: `{report['command']}`.", "",
             "| files | build s | build ms/file | vs smallest | build peak MB | check s | check ms/file | vs smallest "
             "| check peak MB | note |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = report["rows"]
    base = {what: rows[0][what]["seconds"] / rows[0]["files"] for what in ("build", "check")}
    for row in rows:
        cells = [f"{row['files']:,}"]
        for what in ("build", "check"):
            per_file = row[what]["seconds"] / row["files"]
            cells += [f"{row[what]['seconds']:.1f}", f"{1000 * per_file:.3f}", f"{per_file / base[what]:.2f}",
                      f"{row[what]['peak_mb']:.0f}"]
        notes = {warning(row[what]["machine"]) for what in ("build", "check")} - {""}
        cells.append("; ".join(sorted(notes)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cache_fill(out: Path, volumes: int, shape: list[int], workers: list[int]) -> dict:
    """Fill VoCo's compact disk cache from scratch with each number of loader workers -> rows of rates and sizes."""
    import shutil

    from monai.data import DataLoader

    from voco.data.manifest import load_manifest, to_datalist
    from voco.data.phantoms import ensure_phantoms
    from voco.data.regions import build_region_dataset

    manifest = ensure_phantoms(out / "cache_phantoms", n=volumes, seed=0, shape=shape, spacing=[0.8, 0.8, 2.5])
    datalist = to_datalist(load_manifest(manifest))
    rows = []
    for count in workers:
        folder = out / f"cache_{count}_workers"
        shutil.rmtree(folder, ignore_errors=True)
        with SharedMachine() as machine:
            started = time.perf_counter()
            dataset = build_region_dataset(datalist, region_size=(192, 192, 64), cache="disk", cache_dir=folder,
                                           cache_dtype="auto", bad_volumes="stop", preset="ct_abdomen")
            for _ in DataLoader(dataset, batch_size=1, num_workers=count, collate_fn=lambda items: None):
                pass
            seconds = time.perf_counter() - started
        files = [path for path in folder.rglob("*.pt")]
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        rows.append({"workers": count, "seconds": seconds, "volumes_per_s": volumes / seconds,
                     "mb_per_volume": megabytes / max(len(files), 1), "machine": machine.facts()})
        print(f"cache fill with {count} workers: {volumes / seconds:.2f} volumes/s", flush=True)
    return {"volumes": volumes, "shape": shape, "rows": rows}


def cache_markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['cpu_count']} CPU cores; {report['cache']['volumes']} phantoms of "
             f"{'x'.join(map(str, report['cache']['shape']))} voxels; command: `{report['command']}`.", "",
             "| loader workers | fill s | volumes/s | per worker | MB per volume (= GB per 1,000) | note |",
             "|---:|---:|---:|---:|---:|---|"]
    for row in report["cache"]["rows"]:
        per_worker = row["volumes_per_s"] / max(row["workers"], 1)
        lines.append(f"| {row['workers']} | {row['seconds']:.1f} | {row['volumes_per_s']:.2f} | {per_worker:.2f} | "
                     f"{row['mb_per_volume']:.2f} | {warning(row['machine'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/scaling", help="folder for the synthetic files and the results")
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="file counts of the manifest measurement (none: skip it)")
    parser.add_argument("--cache", action="store_true", help="also measure the disk cache fill")
    parser.add_argument("--cache-volumes", type=int, default=8)
    parser.add_argument("--cache-shape", type=int, nargs=3, default=[512, 512, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers of the cache fill")
    arguments = parser.parse_args()
    out = Path(arguments.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]])
    if arguments.cache:
        report = {"date": time.strftime("%Y-%m-%d"), "cpu_count": len(os.sched_getaffinity(0)), "command": command,
                  "cache": cache_fill(out, arguments.cache_volumes, arguments.cache_shape, arguments.workers)}
        write_report(out, "scaling_cache", report, cache_markdown(report))
    if not arguments.counts:
        return
    rows = []
    for count in arguments.counts:
        folder = out / f"files_{count}"
        started = time.perf_counter()
        write_files(folder, count)
        print(f"{count:,} files ready in {time.perf_counter() - started:.0f} s", flush=True)
        manifest = out / f"manifest_{count}.json"
        row = {"files": count, "build": run("build", folder, manifest), "check": run("check", folder, manifest)}
        print(f"{count:,} files: build {row['build']['seconds']:.1f} s, check {row['check']['seconds']:.1f} s",
              flush=True)
        rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu_count": len(os.sched_getaffinity(0)), "rows": rows,
              "command": command}
    write_report(out, "scaling_manifest", report, markdown(report))


if __name__ == "__main__":
    main()

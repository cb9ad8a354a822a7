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

With ``--steps``: VoCo's training step (the bundle's pretext and AdamW, forward + backward + update on the CPU, no
loader) against the batch size (2-16; VoCo needs two regions for its inter-volume term) and the region size (64^3 to 192x192x96, crops tiled as VoCo's layout does)
for the smoke model and the B model (the bundle's own settings, gradient checkpointing on): each point in a fresh
process, so that its peak memory (``VmHWM``) is its own; a point that runs past ``--point-timeout`` is recorded as
such. Per volume, a flat line means the step scales linearly with the batch. Writes OUT/scaling_steps.json, .md and
.png (the plot).

With ``--loader``: the loader's wait as a share of the training wall time against the number of loader workers:
the smoke bundle's own trainer over the compact disk cache of clinical-size phantoms (`pretraining.measure_steps`),
each worker count in a fresh process. Writes OUT/scaling_loader.json and .md.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --out runs/scaling
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --out runs/scaling --counts --cache
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --out runs/scaling --counts --steps --loader
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


# --------------------------------------------------------------------------------------------------
# Training step against batch and region size; loader wait against workers
# --------------------------------------------------------------------------------------------------
# region -> VoCo's crop layout of it (crop size, grid of base crops), as voco.geometry.CropLayout.tiled takes them
REGION_LAYOUTS = {"64x64x64": ((32, 32, 64), (2, 2)), "128x128x64": ((64, 64, 64), (2, 2)),
                  "192x192x64": ((64, 64, 64), (3, 3)), "192x192x96": ((64, 64, 96), (3, 3))}


def step_point(size: str, batch: int, region: str, steps: int, warmup: int) -> dict:
    """VoCo's training step at one (model, batch, region) in this (fresh) process -> median ms, peak MB."""
    import contextlib
    import statistics

    import torch
    from memory import peak_rss_mb
    from torch.utils.flop_counter import FlopCounterMode
    from pretraining import bundle_config

    from voco.allocation import keep_freed_memory

    keep_freed_memory()  # as a training process does (`prepare_run`)
    crop, grid = REGION_LAYOUTS[region]
    parser = bundle_config("voco", size, {"layout": f"$voco.geometry.CropLayout.tiled({crop}, {grid})",
                                          "batch_size": batch, "device": "$torch.device('cpu')"})
    pretext, optimizer = parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")
    regions = torch.rand(batch, 1, *(c * g for c, g in zip(crop, (*grid, 1))), generator=torch.Generator().manual_seed(0))
    pretext.train()
    times, counter = [], FlopCounterMode(display=False)
    for step in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with counter if step == 0 else contextlib.nullcontext():  # FLOPs of the first (untimed) step
            pretext({"image": regions})["loss"].backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    step_ms = 1000 * statistics.median(times)
    return {"step_ms": step_ms, "ms_per_volume": step_ms / batch, "peak_mb": peak_rss_mb(),
            "gflop_per_volume": counter.get_total_flops() / batch / 1e9,
            "parameters": sum(parameter.numel() for parameter in pretext.parameters())}


def loader_point(out: Path, workers: int, steps: int, warmup: int) -> dict:
    """The smoke bundle's trainer over the compact disk cache with this many loader workers -> wait share."""
    import torch
    from pretraining import bundle_config, measure_steps

    from voco.data.phantoms import ensure_phantoms

    manifest = ensure_phantoms(out / "cache_phantoms", n=8, seed=0, shape=[512, 512, 128], spacing=[0.8, 0.8, 2.5])
    parser = bundle_config("voco", "smoke", {
        "manifest": str(manifest), "validation_fraction": 0.0, "cache": "disk", "cache_dir": str(out / "loader_cache"),
        "num_workers": workers, "max_steps": warmup + steps, "train#handlers": [],
        "device": "$torch.device('cpu')"})
    result = measure_steps(parser, steps, warmup, torch.device("cpu"))
    return {key: result[key] for key in ("step_ms", "volumes_per_s", "loader_wait_share", "batch_size")}


def in_fresh_process(arguments: list[str], timeout: float) -> dict:
    """This script with ``--point ARGUMENTS`` in a new interpreter -> its JSON, or why there is none."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "point.json"
        with SharedMachine() as machine:
            try:
                done = subprocess.run([sys.executable, __file__, "--point", *arguments, "--json", str(path)],
                                      capture_output=True, text=True, timeout=timeout)
                result = json.loads(path.read_text()) if done.returncode == 0 else {
                    "failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            except subprocess.TimeoutExpired:
                result = {"failed": f"over {timeout:.0f} s"}
    return {**result, "machine": machine.facts()}


def available_mb() -> float:
    """MemAvailable of /proc/meminfo in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def predicted_peak_mb(measured: list[dict], batch: int) -> float:
    """Peak memory at ``batch`` extrapolated linearly from the two largest batches measured (0: too few)."""
    if len(measured) < 2:
        return 0.0
    small, large = measured[-2], measured[-1]
    per_volume = (large["peak_mb"] - small["peak_mb"]) / (large["batch"] - small["batch"])
    return large["peak_mb"] + per_volume * (batch - large["batch"])


def step_curves(out: Path, sizes: list[str], batches: list[int], regions: list[str], steps: int, timeout: float) -> list:
    rows = []
    for size in sizes:
        for region in regions:
            measured: list[dict] = []
            for batch in batches:
                need = predicted_peak_mb(measured, batch)
                if need > 0.8 * available_mb():  # the machine would swap or kill the process
                    rows.append({"size": size, "region": region, "batch": batch, "failed": (
                        f"needs about {need / 1024:.0f} GB by the smaller batches, {available_mb() / 1024:.0f} GB free")})
                    print(f"step {size} {region} batch {batch}: {rows[-1]['failed']}", flush=True)
                    break
                row = {"size": size, "region": region, "batch": batch,
                       **in_fresh_process(["step", size, str(batch), region, str(steps)], timeout)}
                if "failed" not in row:
                    measured.append(row)
                rows.append(row)
                print(f"step {size} {region} batch {batch}: " + (row["failed"] if "failed" in row else
                      f"{row['step_ms']:.0f} ms, {row['ms_per_volume']:.0f} ms/volume, {row['peak_mb']:.0f} MB"),
                      flush=True)
                if "failed" in row:  # a larger batch of the same region fails too, slower
                    break
    return rows


def steps_markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['cpu_count']} CPU cores (no GPU), one process per point; command: "
             f"`{report['command']}`.", "",
             "| model | region | batch | step ms | ms per volume | per volume vs smallest batch | GFLOP per volume "
             "| peak MB | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    first: dict[tuple, float] = {}
    for row in report["rows"]:
        key = (row["size"], row["region"])
        if "failed" in row:
            lines.append(f"| {row['size']} | {row['region']} | {row['batch']} | not measured: {row['failed']} | | | | | |")
            continue
        first.setdefault(key, row["ms_per_volume"])
        lines.append(f"| {row['size']} | {row['region']} | {row['batch']} | {row['step_ms']:.0f} | "
                     f"{row['ms_per_volume']:.0f} | {row['ms_per_volume'] / first[key]:.2f} | "
                     f"{row['gflop_per_volume']:.0f} | {row['peak_mb']:.0f} | "
                     f"{warning(row['machine'])} |")
    return "\n".join(lines) + "\n"


def steps_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple, list] = {}
    for row in report["rows"]:
        if "failed" not in row:
            series.setdefault((row["size"], row["region"]), []).append(row)
    for (size, region), rows in series.items():
        style = "-o" if size == "smoke" else "--s"
        batches = [row["batch"] for row in rows]
        time_axis.plot(batches, [row["ms_per_volume"] for row in rows], style, label=f"{size} {region}")
        memory_axis.plot(batches, [row["peak_mb"] / 1024 for row in rows], style, label=f"{size} {region}")
    for axis, label in ((time_axis, "ms per volume (forward + backward + AdamW)"), (memory_axis, "peak host GB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    time_axis.set_yscale("log")
    memory_axis.legend(fontsize=7)
    figure.suptitle(f"VoCo training step on {report['cpu_count']} CPU cores, {report['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def loader_markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['cpu_count']} CPU cores; the smoke model over the compact disk "
             f"cache of 8 phantoms of 512x512x128 voxels, the smoke region (64x64x64); command: `{report['command']}`.", "",
             "| loader workers | batch | step ms | volumes/s | loader wait share | note |", "|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        if "failed" in row:
            lines.append(f"| {row['workers']} | not measured: {row['failed']} | | | | |")
            continue
        lines.append(f"| {row['workers']} | {row['batch_size']} | {row['step_ms']:.0f} | {row['volumes_per_s']:.2f} | "
                     f"{100 * row['loader_wait_share']:.1f} % | {warning(row['machine'])} |")
    return "\n".join(lines) + "\n"


def point(arguments: list[str], out: Path) -> dict:
    """One measurement in this (fresh) process: ``step SIZE BATCH REGION STEPS`` or ``loader WORKERS STEPS``."""
    if arguments[0] == "step":
        size, batch, region, steps = arguments[1:]
        return step_point(size, int(batch), region, int(steps), warmup=1)
    workers, steps = arguments[1:]
    return loader_point(out, int(workers), int(steps), warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/scaling", help="folder for the synthetic files and the results")
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="file counts of the manifest measurement (none: skip it)")
    parser.add_argument("--cache", action="store_true", help="also measure the disk cache fill")
    parser.add_argument("--cache-volumes", type=int, default=8)
    parser.add_argument("--cache-shape", type=int, nargs=3, default=[512, 512, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers of the cache fill")
    parser.add_argument("--steps", action="store_true", help="also measure the training step against batch and region")
    parser.add_argument("--sizes", nargs="+", default=["smoke", "B"], choices=["smoke", "B"])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="batch sizes (VoCo needs 2 or more: its inter-volume term)")
    parser.add_argument("--regions", nargs="+", default=list(REGION_LAYOUTS), choices=list(REGION_LAYOUTS))
    parser.add_argument("--timed-steps", type=int, default=3, help="timed steps per point (median; one untimed first)")
    parser.add_argument("--point-timeout", type=float, default=240.0, help="seconds before a point is given up")
    parser.add_argument("--loader", action="store_true", help="also measure the loader's wait against its workers")
    parser.add_argument("--point", nargs="+", default=None, help=argparse.SUPPRESS)  # one point, in a child process
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    out = Path(arguments.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if arguments.point:
        Path(arguments.json).write_text(json.dumps(point(arguments.point, out)))
        return
    command = " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]])
    today = {"date": time.strftime("%Y-%m-%d"), "cpu_count": len(os.sched_getaffinity(0)), "command": command}
    if arguments.steps:
        report = {**today, "rows": step_curves(out, arguments.sizes, arguments.batches, arguments.regions,
                                               arguments.timed_steps, arguments.point_timeout)}
        write_report(out, "scaling_steps", report, steps_markdown(report))
        steps_plot(report, out / "scaling_steps.png")
    if arguments.loader:
        rows = [{"workers": count, **in_fresh_process(["loader", str(count), str(6)], 900)}
                for count in arguments.workers]
        report = {**today, "rows": rows}
        write_report(out, "scaling_loader", report, loader_markdown(report))
    if arguments.cache:
        report = {**today, "cache": cache_fill(out, arguments.cache_volumes, arguments.cache_shape, arguments.workers)}
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

"""Pretraining speed per bundle in one run: data path, model inputs, training step, memory, loader wait.

For each pretraining bundle (voco, mae, query_box, multitask), on the same volumes and the same machine:

- **data path** (CPU ms per volume, at the bundle's training region size from train.json): preprocessing (the
  preset's transforms from the file), reading the disk cache (float32 as the reference caches it, compact,
  compact + zlib), taking the random region, and what a loader worker does per volume (items + collation into
  a batch); cache bytes per volume;
- **model inputs** (ms per volume on the device): the crops / masks / boxes / views the pretext cuts from a batch
  of regions (pretext built from train.json); for VoCo also the reference's per-crop MONAI transform chains on the
  same regions (`voco_inputs.reference_inputs`) and the whole data path after caching against the reference's
  (float32 cache + per-crop chains on the CPU);
- **training step** (model of ``--size``: train.json + smoke.json for SMOKE, train.json alone for B): the
  bundle's own PretextTrainer fed by a DataLoader with workers over the disk cache: step time, volumes/s, the
  share of wall time spent waiting for the loader, FLOPs per step (forward + backward, counted by
  ``torch.utils.flop_counter``) and achieved TFLOP/s;
- **peak memory**: host (``VmHWM`` of the bundle's own process, and the largest unique (USS) and proportional (PSS)
  memory of a loader worker, sampled while they live: `memory`), device (CUDA only).

Each bundle runs in a process of its own (so its peak memory is its own), and the report says how busy the machine
was meanwhile (`machine`: load average, share of the CPUs other processes used); the disk caches under OUT/cache and the
phantoms under OUT/phantoms are kept between runs. Writes OUT/pretraining.json and OUT/pretraining.md.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/pretraining.py --out runs/bench
    .venv/bin/python benchmarks/pretraining.py --size B --volumes 16 --out runs/bench-gpu   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from machine import SharedMachine, warning, write_report
from memory import WorkerMemory, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `voco` from this checkout, installed or not

BUNDLES = {"voco": "voco_pretrain", "mae": "mae_pretrain", "query_box": "querybox_pretrain",
           "multitask": "multitask_pretrain"}
# name -> (cache_dtype, cache_compression) of build_region_dataset
CACHE_SETTINGS = {"float32": ("float32", "none"), "compact": ("auto", "none"), "compact+zlib": ("auto", "zlib")}


# --------------------------------------------------------------------------------------------------
# Configs, volumes, timing
# --------------------------------------------------------------------------------------------------
def bundle_config(bundle: str, size: str, overrides: dict[str, Any]):
    """The bundle's merged configs as `monai.bundle run` reads them (train.json, + smoke.json for SMOKE)."""
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / BUNDLES[bundle] / "configs"
    files = [folder / "train.json"] + ([folder / "smoke.json"] if size == "smoke" else [])
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser.update(overrides)
    return parser


def volumes_manifest(arguments: argparse.Namespace) -> str:
    """The user's manifest, or phantoms of a clinical CT size (kept under OUT/phantoms between runs)."""
    if arguments.manifest:
        return arguments.manifest
    from voco.data.phantoms import ensure_phantoms

    shape, spacing = arguments.phantom_shape, arguments.phantom_spacing
    return str(ensure_phantoms(Path(arguments.out) / "phantoms", arguments.volumes, seed=0,
                               shape_range=[[size, size] for size in shape],
                               in_plane_spacing_range=(spacing[0], spacing[0]),
                               slice_spacing_range=(spacing[2], spacing[2])))


def synchronizing(function: Callable[[], Any], device) -> Callable[[], None]:
    """`function` followed by a device synchronisation, so that a timer sees the device's work."""
    import torch

    def call() -> None:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return call


def peak_host_mb(workers: dict[str, float]) -> dict[str, float]:
    """This process's own peak resident memory (``VmHWM``: a `subprocess` child would inherit its parent's peak in
    ``ru_maxrss``, see `memory`) and the loader workers' peak unique and proportional memory, in MB."""
    return {"process": peak_rss_mb(), **workers}


def _nothing(items: list) -> None:
    """A collate function for loaders run only for their side effect (filling a cache)."""


def fill_caches(arguments: argparse.Namespace) -> None:
    """Preprocess every volume into each disk cache the bundles' measurements read, in loader workers (before the
    bundles' processes, so that their peak memory is their own; caches already filled are only read)."""
    from monai.data import DataLoader

    from voco.data.manifest import load_manifest, to_datalist
    from voco.data.regions import build_region_dataset
    from voco.distributed import loader_workers
    from voco.progress import Progress

    datalist = to_datalist(load_manifest(volumes_manifest(arguments)))
    needed = set()
    for bundle in arguments.bundles:
        recipe_size = tuple(bundle_config(bundle, "B", {}).get_parsed_content("region_size"))
        step_size = tuple(bundle_config(bundle, arguments.size, {}).get_parsed_content("region_size"))
        needed |= {(recipe_size, setting) for setting in CACHE_SETTINGS} | {(step_size, "compact")}
    for region_size, setting in sorted(needed):
        cache_dtype, compression = CACHE_SETTINGS[setting]
        dataset = build_region_dataset(datalist, region_size=region_size, cache="disk",
                                       cache_dir=Path(arguments.out) / "cache", cache_dtype=cache_dtype,
                                       cache_compression=compression, bad_volumes="stop")
        with Progress(len(dataset), f"volumes cached ({setting}, {region_size})", stream=sys.stdout) as progress:
            for _ in DataLoader(dataset, batch_size=1, num_workers=loader_workers(8), collate_fn=_nothing):
                progress.update()
        print(f"cache {setting} of {len(dataset)} volumes at {region_size}: ready", flush=True)


def measure_data_path(datalist: list[dict], region_size: tuple[int, ...], batch_size: int, cache_dir: Path,
                      repeats: int, preset_volumes: int) -> tuple[dict, dict]:
    """CPU ms per volume of preprocessing, and for each cache setting: reading a cached volume into memory
    (zlib: with its decompression), taking the random region (crop + float32), and what a loader worker does in
    all (items + collation into a batch); cache bytes per volume -> (results, {setting: dataset}). One torch
    thread, as in a loader worker."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (and waking idle threads costs ms per op on a busy CPU)
    try:
        return _data_path(datalist, region_size, batch_size, cache_dir, repeats, preset_volumes)
    finally:
        torch.set_num_threads(threads)


def _data_path(datalist: list[dict], region_size: tuple[int, ...], batch_size: int, cache_dir: Path,
               repeats: int, preset_volumes: int) -> tuple[dict, dict]:
    import torch
    from monai import transforms as mt
    from monai.data import list_data_collate
    from voco_inputs import median_ms

    from voco.data.compact import stored_dtype
    from voco.data.regions import build_region_dataset, preset_transforms, region_transforms

    preset = datalist[0].get("preset", "ct_abdomen")
    preprocess = mt.Compose(preset_transforms(preset, region_size))
    preprocessing = []
    for entry in datalist[:preset_volumes]:  # seconds per volume: once each
        start = time.perf_counter()
        preprocess({"image": entry["image"]})
        preprocessing.append((time.perf_counter() - start) * 1000)
    results: dict[str, Any] = {"preset": preset, "region_size": list(region_size),
                               "preprocess_ms": statistics.median(preprocessing)}
    datasets = {}
    for name, (cache_dtype, compression) in CACHE_SETTINGS.items():
        dataset = build_region_dataset(datalist, region_size=region_size, cache="disk", cache_dir=cache_dir,
                                       cache_dtype=cache_dtype, cache_compression=compression, bad_volumes="stop")
        for index in range(len(dataset)):  # reads a filled cache (`fill_caches`), fills a missing one
            dataset[index]
        files = sorted(Path(dataset.dataset.cache_dir).glob("*.pt"))
        steps = region_transforms(region_size, cache_dtype=stored_dtype(preset, cache_dtype), compression=compression)
        unpack = mt.Compose(steps[:1] if compression != "none" else [])  # decompression belongs to the read
        region = mt.Compose(steps[1:] if compression != "none" else steps)
        stored = [unpack(torch.load(path, weights_only=True)) for path in files]
        batches = [list(range(start, start + batch_size)) for start in range(0, len(dataset) - batch_size + 1,
                                                                              batch_size)]

        def read() -> None:
            for path in files:
                unpack(torch.load(path, weights_only=True))

        def take_regions() -> None:
            for item in stored:
                region(item)

        def worker() -> None:
            for batch in batches:
                list_data_collate([dataset[index] for index in batch])

        read_ms, region_ms, worker_ms = median_ms([read, take_regions, worker], repeats)
        results[name] = {"bytes_per_volume": statistics.mean(path.stat().st_size for path in files),
                         "read_ms": read_ms / len(files), "region_ms": region_ms / len(files),
                         "worker_ms": worker_ms / (len(batches) * batch_size),
                         "folder": Path(dataset.dataset.cache_dir).name}
        datasets[name] = dataset
    return results, datasets


# --------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------
def input_makers(pretext) -> dict[str, Callable]:
    """name -> the part of the pretext's step that cuts its model inputs from regions (no network); a cyclic
    pretext gives one per task (it runs one task per step)."""
    from voco.pretext.contrastive import ContrastivePretext
    from voco.pretext.cyclic import CyclicPretext
    from voco.pretext.mae import MaskedImagePretext
    from voco.pretext.query_box import QueryBoxPretext
    from voco.pretext.voco import VoCoPretext

    if isinstance(pretext, CyclicPretext):
        return {name: maker for task in pretext.tasks.values() for name, maker in input_makers(task).items()}
    if isinstance(pretext, VoCoPretext):
        return {"voco": pretext.make_crops}
    if isinstance(pretext, MaskedImagePretext):
        def masks_and_targets(images):
            return pretext.make_mask(images.shape[0], pretext.patch_grid(images.shape[2:]), images.device), \
                pretext.targets(images)
        return {"mae": masks_and_targets}
    if isinstance(pretext, QueryBoxPretext):
        return {"query_box": pretext.make_views}
    if isinstance(pretext, ContrastivePretext):
        return {"contrastive": pretext.make_views}
    raise ValueError(f"no input maker for {type(pretext).__name__}; add one to benchmarks/pretraining.py.")


def measure_inputs(pretext, regions, device, repeats: int) -> dict:
    """ms per volume for each task's inputs on the device; for VoCo on the V2 layout also the reference's
    per-crop MONAI chains (CPU) on the same regions."""
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from voco_inputs import median_ms, reference_inputs

    from voco.geometry import VOCO_V2_LAYOUT
    from voco.pretext.voco import VoCoPretext

    batch_size = regions.shape[0]
    on_device = regions.to(device)
    makers = input_makers(pretext)
    with torch.no_grad():
        times = median_ms([synchronizing(lambda maker=maker: maker(on_device), device) for maker in makers.values()],
                          repeats)
    results = {"per_task_ms": {name: ms / batch_size for name, ms in zip(makers, times)}}
    results["ms"] = statistics.mean(results["per_task_ms"].values())  # a cyclic pretext runs one task per step
    if isinstance(pretext, VoCoPretext) and pretext.layout == VOCO_V2_LAYOUT:
        volumes = [{"image": MetaTensor(region)} for region in regions.cpu()]
        rng = np.random.default_rng(0)
        (reference_ms,) = median_ms([lambda: reference_inputs(volumes, rng)], repeats)
        results["reference_per_crop_monai_ms"] = reference_ms / batch_size
    return results


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------
def measure_steps(parser, steps: int, warmup: int, device) -> dict:
    """Run the bundle's PretextTrainer for warmup + steps iterations; FLOPs are counted in the warm-up steps
    (the counter slows a step), times in the others."""
    import torch
    from ignite.engine import Events
    from torch.utils.flop_counter import FlopCounterMode

    trainer = parser.get_parsed_content("train#trainer")
    batch_size = parser.get_parsed_content("batch_size")
    clock: dict[str, float] = {}
    waits, computes, flops = [], [], []
    counter = FlopCounterMode(display=False)

    def counting(engine) -> bool:
        return engine.state.iteration <= warmup

    @trainer.on(Events.GET_BATCH_STARTED)
    def _fetch_started(engine) -> None:
        clock["fetch"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _fetch_completed(engine) -> None:
        clock["wait"] = time.perf_counter() - clock["fetch"]

    @trainer.on(Events.ITERATION_STARTED)
    def _step_started(engine) -> None:
        if counting(engine):
            counter.__enter__()
        clock["step"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step_completed(engine) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - clock["step"]
        if counting(engine):
            counter.__exit__(None, None, None)
            flops.append(counter.get_total_flops())
        else:
            waits.append(clock["wait"])
            computes.append(seconds)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with WorkerMemory() as workers:
        trainer.run()
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    del trainer
    gc.collect()  # ends the persistent loader workers, so that their peak memory is counted
    wall = sum(waits) + sum(computes)
    step_seconds = statistics.mean(computes)
    flops_per_step = statistics.mean(flops) if flops else None
    return {"batch_size": batch_size, "steps_timed": len(computes), "step_ms": step_seconds * 1000,
            "step_ms_median": statistics.median(computes) * 1000,
            "volumes_per_s": batch_size * len(computes) / wall, "loader_wait_share": sum(waits) / wall,
            "flops_per_step": flops_per_step,
            "tflops_per_s": flops_per_step / step_seconds / 1e12 if flops_per_step else None,
            "device_peak_mb": device_peak,
            "workers_memory": {"worker_unique": workers.peak_unique_mb, "worker_pss": workers.peak_pss_mb,
                               "workers_seen": workers.count}}


# --------------------------------------------------------------------------------------------------
# One bundle (in its own process)
# --------------------------------------------------------------------------------------------------
def measure_bundle(bundle: str, arguments: argparse.Namespace) -> dict:
    import torch

    from voco.data.manifest import load_manifest, to_datalist

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    from voco.allocation import keep_freed_memory

    keep_freed_memory()  # as the bundle's own prepare_run does in a training process
    out = Path(arguments.out)
    manifest = volumes_manifest(arguments)
    datalist = to_datalist(load_manifest(manifest))
    device = torch.device(arguments.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = bundle_config(bundle, "B", {}).get_parsed_content("num_workers") if arguments.workers is None \
        else arguments.workers
    common = {"manifest": manifest, "validation_fraction": 0.0, "cache": "disk",
              "cache_dir": str((out / "cache").resolve()), "device": f"$torch.device('{device}')"}
    result: dict[str, Any] = {"bundle": bundle, "size": arguments.size, "device": str(device), "workers": workers}

    # Data path and model inputs: the real recipe (train.json), whatever model size the step uses.
    recipe = bundle_config(bundle, "B", common)
    region_size = tuple(recipe.get_parsed_content("region_size"))
    batch_size = recipe.get_parsed_content("batch_size")
    if len(datalist) < max(batch_size, arguments.batch or 0):
        raise SystemExit(f"{bundle} trains on batches of {max(batch_size, arguments.batch or 0)} but the manifest has "
                         f"{len(datalist)} volumes; give --volumes (or a manifest with) that many or more.")
    result["data"], datasets = measure_data_path(datalist, region_size, batch_size, out / "cache", arguments.repeats,
                                                 arguments.preset_volumes)
    compact = datasets["compact"]
    regions = torch.stack([torch.Tensor(compact[index % len(compact)]["image"]) for index in range(batch_size)])
    pretext = recipe.get_parsed_content("pretext").to(device)
    result["inputs"] = measure_inputs(pretext, regions, device, arguments.repeats)
    del pretext, recipe
    gc.collect()

    # The whole CPU data path per volume after caching: ours (compact item; VoCo's crops are cut on the device,
    # so on the CPU only when the device is the CPU) against the reference's (float32 item + per-crop chains).
    reference_inputs_ms = result["inputs"].get("reference_per_crop_monai_ms")
    if reference_inputs_ms is not None:
        ours = result["data"]["compact"]["worker_ms"] + (result["inputs"]["ms"] if device.type == "cpu" else 0.0)
        result["data_path_after_cache"] = {
            "ours_ms": ours, "reference_ms": result["data"]["float32"]["worker_ms"] + reference_inputs_ms}

    # Training step: the bundle's trainer at the chosen model size, over the compact disk cache.
    step_config = bundle_config(bundle, arguments.size, {
        **common, "num_workers": workers, "max_steps": arguments.warmup + arguments.steps, "train#handlers": [],
        "compile": arguments.compile, **({"batch_size": arguments.batch} if arguments.batch else {})})
    result["compile"] = arguments.compile
    result["step_region_size"] = list(step_config.get_parsed_content("region_size"))
    result["step"] = measure_steps(step_config, arguments.steps, arguments.warmup, device)
    if arguments.peak_tflops and result["step"]["tflops_per_s"]:
        result["step"]["share_of_peak"] = result["step"]["tflops_per_s"] / arguments.peak_tflops
    result["host_peak_mb"] = peak_host_mb(result["step"].pop("workers_memory"))
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.1f}x" if numerator and denominator else "n/a"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    environment = report["environment"]
    lines = [f"Measured {environment['date']} on {environment['device_name']} ({environment['cpu_count']} CPU cores, "
             f"torch {environment['torch']}, {environment['threads']} torch thread(s)); command: "
             f"`{environment['command']}`.", ""]
    lines += ["**Data path** (CPU ms per volume at the recipe's region size, one thread as in a loader worker, cache "
              "files in the page cache; read: "
              "file to memory, with zlib's decompression; region: crop + float32; worker: items + collation into "
              "a batch, what a loader worker does)", "",
              "| bundle | region | preprocess | cache MB per volume (= GB per 1,000 volumes, on disk or in memory) "
              "f32 / compact / zlib | footprint vs f32 | read f32 / compact / zlib | region f32 / compact / zlib | "
              "worker f32 / compact / zlib |",
              "|---|---|---|---|---|---|---|---|"]
    for result in report["bundles"]:
        data = result["data"]
        settings = [data[name] for name in CACHE_SETTINGS]

        def three(key: str, scale: float = 1.0, digits: int = 1) -> str:
            return " / ".join(number(setting[key] * scale, digits) for setting in settings)

        footprint = " / ".join(f"{setting['bytes_per_volume'] / settings[0]['bytes_per_volume']:.2f}"
                               for setting in settings[1:])
        lines.append(f"| {result['bundle']} | {'x'.join(map(str, data['region_size']))} | "
                     f"{number(data['preprocess_ms'], 0)} | {three('bytes_per_volume', 1e-6, 2)} | {footprint} | "
                     f"{three('read_ms')} | {three('region_ms')} | {three('worker_ms')} |")
    lines += ["", "**Model inputs and the reference baseline** (ms per volume; VoCo's baseline: the reference's "
              "per-crop MONAI chains on the CPU, same regions)", "",
              "| bundle | device | inputs, ours | inputs, per-crop MONAI | ratio | data path after cache, "
              "reference (f32 worker + chains) | ours (compact worker + inputs on CPU) | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for result in report["bundles"]:
        inputs, path = result["inputs"], result.get("data_path_after_cache", {})
        reference = inputs.get("reference_per_crop_monai_ms")
        lines.append(f"| {result['bundle']} | {result['device']} | {number(inputs['ms'], 2)} | {number(reference, 2)} | "
                     f"{ratio(reference, inputs['ms'])} | {number(path.get('reference_ms'))} | "
                     f"{number(path.get('ours_ms'))} | {ratio(path.get('reference_ms'), path.get('ours_ms'))} |")
    lines += ["", f"**Training step** ({report['environment']['size']} model, the bundle's PretextTrainer over the "
              f"compact disk cache, loader with workers; mean of the timed steps)", "",
              "| bundle | region | batch | workers | step ms | volumes/s | loader wait | GFLOP/step | TFLOP/s | "
              "share of peak | host peak MB (process / worker unique / worker PSS) | device peak MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["bundles"]:
        step, host = result["step"], result["host_peak_mb"]
        gflops = step["flops_per_step"] / 1e9 if step["flops_per_step"] else None
        lines.append(f"| {result['bundle']} | {'x'.join(map(str, result['step_region_size']))} | "
                     f"{step['batch_size']} | {result['workers']} | {number(step['step_ms'], 0)} | "
                     f"{number(step['volumes_per_s'], 2)} | {step['loader_wait_share']:.1%} | {number(gflops, 1)} | "
                     f"{number(step['tflops_per_s'], 3)} | {percent(step.get('share_of_peak'))} | "
                     f"{number(host['process'], 0)} / {number(host['worker_unique'], 0)} / "
                     f"{number(host['worker_pss'], 0)} | "
                     f"{number(step['device_peak_mb'], 0)} |")
    lines += ["", "**The machine during each bundle's measurement** (1-minute load average before / after; the share "
              "of all cores' time other processes used)", "", "| bundle | load before / after | other work | |",
              "|---|---|---|---|"]
    for result in report["bundles"]:
        facts = result.get("machine", {})
        lines.append(f"| {result['bundle']} | {number(facts.get('load_before'), 2)} / "
                     f"{number(facts.get('load_after'), 2)} | {percent(facts.get('other_share'))} | "
                     f"{warning(facts)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="folder for the results, caches and phantoms")
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    parser.add_argument("--size", default="smoke", choices=["smoke", "B"], help="model of the training step")
    parser.add_argument("--manifest", default=None, help="volumes to use (default: phantoms of --phantom-shape)")
    parser.add_argument("--volumes", type=int, default=8, help="number of phantoms")
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=[512, 512, 128])
    parser.add_argument("--phantom-spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="mm")
    parser.add_argument("--preset-volumes", type=int, default=3, help="volumes whose preprocessing is timed")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each CPU timing (median)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (FLOPs counted there)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the bundle's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of the step (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the backbone as the bundles' --compile True does (raise --warmup: the "
                             "first steps compile)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 matrix rate, to report the share of it a step achieves "
                             "(H100/H200 SXM: 989)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one bundle, in a child process
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.only:
        Path(arguments.json).write_text(json.dumps(measure_bundle(arguments.only, arguments), indent=2))
        return

    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "phantom 3/8 written ...": the first run's minutes
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    fill_caches(arguments)  # once, before the bundles' processes
    results = []
    for bundle in arguments.bundles:
        print(f"measuring {bundle} ...", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "result.json"
            with SharedMachine() as machine:
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", bundle, "--json", str(path)],
                               check=True)
            results.append({**json.loads(path.read_text()), "machine": machine.facts()})
    cuda = torch.cuda.is_available() and arguments.device in (None, "cuda")
    report = {"environment": {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "benchmarks/pretraining.py", *sys.argv[1:]]),
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "threads": arguments.threads or torch.get_num_threads(), "size": arguments.size},
        "bundles": results}
    write_report(out, "pretraining", report, markdown(report))


if __name__ == "__main__":
    main()

"""The benchmark grid: tasks × encoders × modes × seeds, each cell one fine-tuning run of the downstream bundle.

A cell is one MLflow run in experiment ``benchmark-<task>``, named by `voco.benchmark.cells.run_name` from the
cell alone. That makes the grid resumable: `run_grid` asks the store which runs have finished (status FINISHED with
a ``best/`` metric) and never runs those again, so an interrupted grid is finished by running the same command::

    cells = plan_grid(["btcv"], ["VoCo_B_SSL_head.pt", "scratch"], seeds=(0, 1, 2))
    rows = run_grid(cells, dataset_dirs={"btcv": "/data/BTCV"})   # [{cell, status, error}]

`voco benchmark report` (`voco.benchmark.report`) then reads the finished runs back and compares them with the
published numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from voco.benchmark.cells import ENCODER_MODES, Cell
from voco.bundles import config_paths, run_bundle
from voco.errors import ConfigError, VocoError, optional_import

EXPERIMENT_PREFIX = "benchmark-"


def _is_scratch(pretrained: Any) -> bool:
    return pretrained in (None, "", "scratch")


def plan_grid(tasks: Iterable[str], pretrained: Iterable[str], *, seeds: Iterable[int] = (0,),
              modes: Iterable[str] | None = None, backbone: str | None = None, size: str | int | None = None,
              training_cases: int | None = None, default_size: str | int | None = None) -> list[Cell]:
    """The cells of a grid, task by task, then encoder, mode and seed.

    Args:
        tasks: registry task ids, or paths of a user's own dataset.json (`voco.benchmark.own_data`); checked: an
            unknown or not fine-tunable task is a ConfigError.
        pretrained: checkpoint paths and / or "scratch".
        seeds: one cell per seed.
        modes: how each checkpoint is used ("finetune", "frozen", "linear_probe"); default ("finetune",).
            "scratch" always gets the one mode "scratch". A vision-language task takes CLIP checkpoints only and
            its own modes ("zero_shot", "finetune": `voco.benchmark.vision_language.plan_cells`).
        training_cases: the few-label setting for every cell (None: all training cases).
        backbone, size: the network of every cell; None (default): each checkpoint's pretraining plan says
            (`voco.benchmark.pretrained_plan.network_settings`), and "scratch" takes the network of the first
            checkpoint listed, so that it is compared with the same network; else "swin" and `default_size` (None:
            the backbone's default size).

    Raises:
        ConfigError: an empty list, an unknown task or mode, or two checkpoints whose file names give the same
            encoder name (their runs would share names, and one would be taken for the other's finished run).
    """
    from voco.benchmark import ct_rate, vision_language
    from voco.benchmark.cells import encoder_name
    from voco.benchmark.finetune import require_finetune_type
    from voco.benchmark.own_data import own_dataset, resolve_task

    task_list = list({task.id: task for task in (require_finetune_type(resolve_task(str(name)), GRID_TASK_TYPES)
                                                 for name in tasks)}.values())
    task_ids = [task.id for task in task_list]
    sources = list(dict.fromkeys("scratch" if _is_scratch(source) else str(source) for source in pretrained))
    seed_list = list(dict.fromkeys(_whole(seed, "seed") for seed in seeds))
    mode_list = list(dict.fromkeys(str(mode) for mode in (modes or ("finetune",))))
    for name, values in (("task", task_ids), ("pretrained", sources), ("seed", seed_list), ("mode", mode_list)):
        if not values:
            raise ConfigError(f"the grid has no {name}; give at least one {name}.")
    unknown = [mode for mode in mode_list if mode not in ENCODER_MODES + ct_rate.MODES]
    if unknown:
        hint = " (train from scratch by adding 'scratch' to the pretrained list)" if "scratch" in unknown else ""
        raise ConfigError(f"the mode {unknown[0]!r} is not a way to use a pretrained encoder; use "
                          f"{', '.join(ENCODER_MODES)} (vision-language tasks: "
                          f"{', '.join(ct_rate.MODES)}){hint}.")
    if training_cases is not None:
        training_cases = _whole(training_cases, "training_cases")
    by_encoder: dict[str, str] = {}
    for source in sources:
        encoder = encoder_name(source)
        if encoder in by_encoder:
            raise ConfigError(f"the checkpoints {by_encoder[encoder]} and {source} both give the encoder name "
                              f"{encoder!r} used in run names; rename one of the files.")
        by_encoder[encoder] = source
    networks = {source: _network_of(source, backbone, size, default_size) for source in sources}
    first = next((network for source, network in networks.items() if source != "scratch"), None)
    if "scratch" in networks and first and (backbone is None or str(backbone).lower() == first[0]):
        networks["scratch"] = (first[0], first[1] if size is None else str(size))
    cells = []
    for task in task_list:
        if task.task_type == "vision-language":  # CLIP checkpoints, their backbone, the task's own modes
            cells += vision_language.plan_cells(task, sources, modes=mode_list if modes else None, seeds=seed_list,
                                                training_cases=training_cases)
            continue
        encoder_modes = [mode for mode in mode_list if mode in ENCODER_MODES]
        if not encoder_modes:
            raise ConfigError(f"the modes {', '.join(mode_list)} are for vision-language tasks; add finetune, frozen "
                              f"or linear_probe to --modes for {task.id}.")
        for source in sources:
            for mode in (["scratch"] if source == "scratch" else encoder_modes):
                for seed in seed_list:
                    cells.append(Cell(task.id, source, mode, seed, *networks[source], training_cases,
                                      own_dataset(task) or None))
    return cells


def _network_of(source: str, backbone: str | None, size: str | int | None, default_size: str | int | None
                ) -> tuple[str, str]:
    """(backbone, size) of a cell: as given, else the checkpoint's pretraining plan's, else swin / `default_size`."""
    from voco.benchmark.pretrained_plan import network_settings
    from voco.checkpoints.plan import read_plan
    from voco.errors import CheckpointError

    try:
        plan = None if source == "scratch" or not Path(source).expanduser().is_file() else read_plan(source)
    except CheckpointError:  # an unreadable file: its cell's run says so, in its own sentence
        plan = None
    settings = network_settings(plan, backbone=backbone, size=size, default_size=default_size)
    return settings["backbone"], str(settings["size"])


def _whole(value: Any, name: str) -> int:
    """A whole number from an int or its text ("3"); ConfigError otherwise."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} is {value!r}; give a whole number.")
    return value


def grid_settings(cell: Cell, settings: Mapping[str, Any], config_files: Sequence[str]) -> dict:
    """What changes a cell's result beyond what its run name says: the configs, the settings given to every cell,
    and the content of the encoder file and of the task's datalist (their SHA-256), as plain data."""
    from voco.benchmark.own_data import resolve_task
    from voco.files import sha256_of

    recorded = {"configs": list(config_files)}
    recorded.update({key: value for key, value in settings.items()
                     if key not in set(cell.settings()) | {"tracking_uri", "dataset_dir", "run_name"}})
    if not _is_scratch(cell.pretrained) and Path(settings["pretrained"]).is_file():
        recorded["encoder_sha256"] = _digest(settings["pretrained"], sha256_of)
    datalist = settings.get("datalist") or resolve_task(cell.source or cell.task).datalist_file
    if settings.get("dataset_dir") and datalist and (Path(settings["dataset_dir"]) / datalist).is_file():
        recorded["datalist_sha256"] = _digest(str(Path(settings["dataset_dir"]) / datalist), sha256_of)
    return json.loads(json.dumps(recorded, sort_keys=True, default=str))  # as the MLflow tag gives it back


_DIGESTS: dict[tuple, str] = {}


def _digest(path: str, sha256_of: Callable[[str], str]) -> str:
    """The SHA-256 of a file, read once per (path, size, modification time) in this process."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_of(path)
    return _DIGESTS[key]


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """``max_epochs 20 there, 100 here; ...``: the grid settings in which a finished run differs from this one."""
    return "; ".join(f"{key} {recorded.get(key, 'unset')} there, {current.get(key, 'unset')} here"
                     for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key))


def finished_settings(tracking_uri: str | None = None) -> dict[str, list[dict | None]]:
    """Run name -> the grid settings (`grid_settings`, as the bundle recorded them in the tag
    ``voco.grid_settings``) of each FINISHED run of that name; None for a run recorded without them."""
    finished: dict[str, list[dict | None]] = {}
    for run in finished_runs(tracking_uri):
        recorded = run.data.tags.get("voco.grid_settings")
        try:
            settings = json.loads(recorded) if recorded else None
        except ValueError:
            settings = None
        finished.setdefault(run.info.run_name, []).append(settings)
    return finished


def finished_cells(tracking_uri: str | None = None) -> set[str]:
    """Run names of the FINISHED runs with a ``best/`` metric in the ``benchmark-*`` experiments of the store."""
    return {run.info.run_name for run in finished_runs(tracking_uri)}


def finished_runs(tracking_uri: str | None = None, experiment_names: Sequence[str] | None = None) -> list:
    """The MLflow runs behind `finished_cells` (all pages), of the given experiments or every ``benchmark-*`` one."""
    from voco.tracking import default_tracking_uri

    mlflow = optional_import("mlflow", "reading benchmark runs")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    if experiment_names is None:
        experiments = [experiment for experiment in _all_pages(client.search_experiments,
                                                               filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")
                       if experiment.name.startswith(EXPERIMENT_PREFIX)]  # LIKE's '-' is literal; '_' is not used
    else:
        experiments = [client.get_experiment_by_name(name) for name in experiment_names]
        experiments = [experiment for experiment in experiments if experiment is not None]
    if not experiments:
        return []
    runs = _all_pages(client.search_runs, [experiment.experiment_id for experiment in experiments],
                      filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    return [run for run in runs if any(key.startswith("best/") for key in run.data.metrics)]


def _all_pages(search: Callable, *args: Any, **kwargs: Any) -> list:
    """Every result of an MLflow search call, following its page tokens."""
    results, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        results.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return results


def _error_line(error: BaseException) -> str:
    """One line for a failed cell: the message of the first VocoError in the chain (what the user can fix), else
    the exception's type and the first line of its message."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        if isinstance(current, VocoError):
            return str(current).strip().splitlines()[0] if str(current).strip() else type(current).__name__
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _mark_failed(tracking_uri: str, cell: Cell) -> None:
    """Mark the cell's run that the failed attempt left RUNNING as FAILED (best effort: it is only bookkeeping; the
    next attempt reuses a run of that name that is not FINISHED either way)."""
    try:
        mlflow = optional_import("mlflow", "marking a failed benchmark run")
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT_PREFIX + cell.task)
        if experiment is None:
            return
        for run in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"):
            if run.info.run_name == cell.run_name:
                client.set_terminated(run.info.run_id, "FAILED")
    except Exception:  # noqa: BLE001 - never let bookkeeping hide the cell's own error
        pass


def _dataset_dir_of(dataset_dirs: Mapping[str, Any] | str | os.PathLike | None, cell: Cell) -> str | None:
    """The dataset folder of a cell's task: given for every task, given for this one, or (a user's own dataset)
    the folder of its dataset file."""
    task = cell.task
    own_folder = str(Path(cell.source).parent) if cell.source else None
    if dataset_dirs is None:
        return own_folder
    if isinstance(dataset_dirs, (str, os.PathLike)):
        return str(Path(dataset_dirs).expanduser().resolve())
    by_lower = {str(key).lower(): value for key, value in dataset_dirs.items()}
    if task.lower() not in by_lower and own_folder is not None:
        return own_folder
    if task.lower() not in by_lower:
        raise ConfigError(f"no dataset folder is given for the task {task!r} (given for "
                          f"{', '.join(map(str, dataset_dirs)) or 'none'}); add {task}=<folder> to --dataset_dir.")
    return str(Path(by_lower[task.lower()]).expanduser().resolve())


def parse_list(value: Any) -> list[str]:
    """A list from a fire argument: "a,b" arrives as a string or a tuple, "a" as a string, 3 as a number."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in parse_list(part)]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def parse_dataset_dirs(value: Any) -> dict[str, str] | str | None:
    """--dataset_dir: one folder for every task, or task=folder pairs separated by commas."""
    parts = parse_list(value)
    if not parts:
        return None
    if not any("=" in part for part in parts):
        if len(parts) > 1:
            raise ConfigError(f"--dataset_dir {','.join(parts)} gives several folders; give one folder, or one "
                          f"task=folder per task, e.g. btcv=/data/BTCV,msd-task09-spleen=/data/Task09_Spleen.")
        return parts[0]
    pairs = {}
    for part in parts:
        task, separator, folder = part.partition("=")
        if not separator or not task.strip() or not folder.strip():
            raise ConfigError(f"--dataset_dir has {part!r}; give task=folder pairs separated by commas, e.g. "
                          f"btcv=/data/BTCV.")
        pairs[task.strip()] = folder.strip()
    return pairs


GRID_TASK_TYPES = ("segmentation", "classification", "registration", "vision-language")


def bundle_runner(config_files: Sequence[str] = ("train.json",)) -> Callable[[Cell, dict], None]:
    """The default runner: the downstream_benchmark bundle in this process (`monai.bundle.run`), MLflow tracking."""
    config_paths("downstream_benchmark", config_files)  # fail before the first cell, not after it

    def run(cell: Cell, settings: dict) -> None:
        from voco.benchmark.own_data import resolve_task
        from voco.benchmark.vision_language import CONFIG_FILES

        files = list(config_files)
        task_type = resolve_task(cell.source or cell.task).task_type
        if task_type == "registration":  # the registration override after whatever configs the grid uses
            files.append("registration.json")
        elif task_type == "vision-language":  # the mode's configs right after train.json: later overrides still win
            files[1:1] = CONFIG_FILES[cell.mode]
        run_bundle("downstream_benchmark", files, tracking="mlflow", **settings)

    return run


def run_grid(cells: Sequence[Cell], *, dataset_dirs: Mapping[str, Any] | str | os.PathLike | None,
             tracking_uri: str | None = None, config_files: Sequence[str] = ("train.json",),
             overrides: Mapping[str, Any] | None = None,
             runner: Callable[[Cell, dict], Any] | None = None) -> list[dict]:
    """Run the cells one after the other, skipping those the store holds as finished.

    Prints ``[i/n] <run name>`` before each run, ``[i/n] skip <run name>: finished`` for a finished cell and
    ``[i/n] failed <run name>: <error>`` for a cell whose run raised; a failure does not stop the grid.

    Args:
        cells: from `plan_grid`.
        dataset_dirs: the dataset folder of each task ({task: folder}), one folder for every task, or None where
            the config makes its own (the smoke config's phantoms); a user's own dataset defaults to the folder of
            its dataset file.
        tracking_uri: the MLflow store (default: `voco.tracking.default_tracking_uri()`).
        config_files: bundle config files, e.g. ("train.json", "smoke.json").
        overrides: further bundle settings for every cell, e.g. {"max_epochs": 50, "val_interval": 5}.
        runner: ``runner(cell, settings)`` runs one cell, where settings are the bundle overrides (task, pretrained,
            mode, ..., dataset_dir, tracking_uri, the overrides); default: the bundle in this process.

    Returns:
        one row per cell: {"cell": Cell, "status": "done" | "skipped" | "failed", "error": str | None}.

    Raises:
        ConfigError: before anything runs, for a task without a dataset folder or a checkpoint file that does not
            exist (among the cells still to run).
    """
    from voco.progress import format_duration
    from voco.tracking import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    runner = runner or bundle_runner(config_files)
    finished = finished_settings(tracking_uri)
    to_run = [cell for cell in cells if cell.run_name not in finished]
    folders = {cell.task: _dataset_dir_of(dataset_dirs, cell) for cell in cells}
    for cell in cells:  # a typo in a path should not cost the cells before it
        if not _is_scratch(cell.pretrained) and not Path(cell.pretrained).expanduser().is_file() and (
                cell in to_run or folders[cell.task] is not None):
            raise ConfigError(f"the checkpoint {cell.pretrained} does not exist; give the path of an exported "
                              f"encoder (voco export) or an official VoCo checkpoint.")
    rows, total, spent = [], len(cells), []
    for index, cell in enumerate(cells, start=1):
        name, prefix = cell.run_name, f"[{index}/{total}]"
        settings = {**cell.settings(), "tracking_uri": tracking_uri, **dict(overrides or {})}
        if _is_scratch(cell.pretrained):
            settings["pretrained"] = "scratch"
        elif Path(cell.pretrained).expanduser().is_file():
            settings["pretrained"] = str(Path(cell.pretrained).expanduser().resolve())
        if folders[cell.task] is not None:
            settings["dataset_dir"] = folders[cell.task]
        current = grid_settings(cell, settings, config_files)
        # A finished run is this cell only where it ran with the same settings (or recorded none: an older run;
        # or its encoder file is gone, so nothing can be compared or rerun).
        recorded = finished.get(name, [])
        gone = not _is_scratch(cell.pretrained) and "encoder_sha256" not in current
        if recorded and (gone or any(settings_of is None or settings_of == current for settings_of in recorded)):
            print(f"{prefix} skip {name}: finished", flush=True)
            rows.append({"cell": cell, "status": "skipped", "error": None})
            continue
        if recorded:  # the same cell with other settings: a run of its own, beside the finished one
            suffix = hashlib.sha1(json.dumps(current, sort_keys=True, default=str).encode()).hexdigest()[:6]
            print(f"{prefix} {name} finished with other settings ({settings_differences(recorded[-1], current)}): "
                  f"running it as {name}-{suffix}", flush=True)
            name = settings["run_name"] = f"{name}-{suffix}"
            if any(settings_of == current for settings_of in finished.get(name, [])):
                print(f"{prefix} skip {name}: finished", flush=True)
                rows.append({"cell": cell, "status": "skipped", "error": None})
                continue
        print(f"{prefix} {name}", flush=True)
        settings["grid_settings"] = json.dumps(current, sort_keys=True, default=str)
        start = time.perf_counter()
        try:
            runner(cell, settings)
        except Exception as error:  # noqa: BLE001 - one cell's failure is reported, the grid goes on
            message = _error_line(error)
            print(f"{prefix} failed {name}: {message}", flush=True)
            _mark_failed(tracking_uri, cell)
            rows.append({"cell": cell, "status": "failed", "error": message})
            continue
        finished = finished_settings(tracking_uri)
        if name not in finished:  # the store is what makes the grid resumable: a run it does not hold is not done
            message = (f"the run returned but {tracking_uri} holds no FINISHED run named {name} with a best/ "
                       f"metric; check the tracking settings")
            print(f"{prefix} failed {name}: {message}", flush=True)
            rows.append({"cell": cell, "status": "failed", "error": message})
            continue
        spent.append(time.perf_counter() - start)
        left = total - index
        pace = (f"; {left} cell{'' if left == 1 else 's'} left, about {format_duration(left * sum(spent) / len(spent))}"
                f" at this pace" if left else "")
        print(f"{prefix} done {name} in {spent[-1]:.0f} s{pace}", flush=True)
        rows.append({"cell": cell, "status": "done", "error": None})
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed")}
    print(f"grid: {counts['done']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed",
          flush=True)
    return rows

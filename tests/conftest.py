"""Shared fixtures: the real sample volumes of ../shared/data and small temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

# Before numpy/scipy load: their OpenBLAS threads otherwise fight torch's OpenMP threads for the cores and make
# CPU training steps ~10x slower on a small machine (measured on 2 cores). Subprocesses inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker, the workers share the cores
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`$VOCO_SHARED_DATA`, or ../shared/data beside the checkout; None where neither exists."""
    candidates = [os.environ.get("VOCO_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ct_abdomen_3mm.nii.gz").is_file():
            return Path(candidate)
    return None


# The three real sample volumes: (file name, shape, spacing in mm, orientation, dtype, modality). Their stand-ins
# are phantoms written with the same properties, so a clean clone (no ../shared/data) checks the same things.
SAMPLE_VOLUMES = (("ct_abdomen_3mm.nii.gz", (122, 101, 112), 3.0, "RAS", "int32", "CT"),
                  ("ct_thorax_1p5mm.nii.gz", (122, 102, 112), 1.5, "LPS", "int16", "CT"),
                  ("mr_abdomen_3mm.nii.gz", (117, 91, 20), 3.0, "LPS", "int16", "MR"))


def write_sample_stand_ins(folder: Path) -> Path:
    """Phantoms in place of the real sample volumes: the same names, shapes, spacings, orientations (the thorax
    and MR files stored LPS, flipped on disk), dtypes and value ranges (CT in HU beyond both windows; MR positive
    with air at 0 and a slightly negative minimum, as the real one)."""
    import nibabel as nib
    import numpy as np

    from voco.data.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, shape, spacing, orientation, dtype, modality) in enumerate(SAMPLE_VOLUMES):
        phantom = make_phantom(seed, shape=shape, spacing=(spacing,) * 3, orientation=orientation)
        values = np.clip(np.rint(phantom.image), -1024, 3071)
        if modality == "MR":  # a T1-like mapping of the anatomy: air 0, fat bright, one voxel just below zero
            values = np.where(values > -500, np.clip(0.5 * (values + 600.0), 1.0, 833.0), 0.0)
            values.flat[0] = -47.0
        image = nib.Nifti1Image(values.astype(dtype), phantom.affine)
        image.header.set_qform(phantom.affine, code=1)
        image.header.set_sform(phantom.affine, code=1)
        nib.save(image, str(folder / name))
    return folder


def all_loggers() -> list:
    import logging

    return [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                    if isinstance(logger, logging.Logger)]


@pytest.fixture(autouse=True)
def _drop_log_handlers_of_closed_streams():
    """A bundle run in the test process (`voco.bundles.run_bundle`) configures logging from its logging.conf with
    handlers on the sys.stdout/stderr of that test, which pytest closes afterwards; a later test's log records
    would print "--- Logging error ---" into what it checks."""
    import logging

    for logger in all_loggers():
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                logger.removeHandler(handler)
    yield


_STORE_TEMPLATE: list[Path] = []


def tracking_store(folder: Path) -> str:
    """The URI of an embedded MLflow store at ``folder/runs/mlflow.db`` as a run would create it, copied from one
    made once per session: creating MLflow's tables takes 1.6 s, which each bundle test would otherwise pay again."""
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        import mlflow

        template = Path(tempfile.mkdtemp(prefix="voco_store_")) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()  # creates the tables
        _STORE_TEMPLATE.append(template)
    store = Path(folder) / "runs" / "mlflow.db"
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_STORE_TEMPLATE[0], store)
    return f"sqlite:///{store}"


@pytest.fixture(scope="session")
def real_shared_data() -> Path:
    directory = shared_data_dir()
    if directory is None:
        pytest.skip("the real sample volumes are absent: set VOCO_SHARED_DATA or put them at ../shared/data")
    return directory


@pytest.fixture(scope="session", params=["real", "stand-in"])
def shared_data(request, tmp_path_factory) -> Path:
    """The sample volumes: the real ones (skipped where absent) and their phantom stand-ins (always)."""
    if request.param == "real":
        return request.getfixturevalue("real_shared_data")
    return write_sample_stand_ins(tmp_path_factory.mktemp("sample_volumes"))


def run_bundle_command(bundle: str, config_files: list[str], cwd: Path, *overrides: str, launcher: list[str] | None = None,
                       env: dict | None = None):
    """`python -m monai.bundle run` of bundles/<bundle> with these config files, as a user types it; asserts exit 0.

    With a launcher (torchrun) or its own environment it starts a process; otherwise the same module runs with the
    same command line in this process (`run_module_in_process`), which saves the ~9 s interpreter and MONAI start."""
    import subprocess

    command = bundle_command(bundle, config_files, *overrides)
    tracking_store(cwd)  # every bundle tracks into cwd/runs/mlflow.db by default: start from the migrated template
    if launcher:  # e.g. torchrun in place of the interpreter
        command = list(launcher) + command[1:]
    if launcher or env is not None:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    else:
        result = run_module_in_process(command, cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_module_in_process(command: list[str], cwd: Path):
    """``command`` (``[python, "-m", module, *arguments]``) as `runpy` runs ``python -m`` — in ``cwd``, with its
    stdout/stderr captured and its exit status taken from SystemExit or an uncaught exception, as the interpreter
    would — in this process -> `subprocess.CompletedProcess`. Logging (a bundle's logging.conf reconfigures it and
    disables the loggers it does not name), warning filters, the working folder and sys.argv are restored after."""
    import contextlib
    import io
    import runpy
    import subprocess
    import sys
    import warnings

    def show_on_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    assert command[1] == "-m", command
    loggers = {logger: (logger.disabled, logger.level, list(logger.handlers), logger.propagate)
               for logger in all_loggers()}
    stdout, stderr = io.StringIO(), io.StringIO()
    previous_folder, previous_argv, returncode = os.getcwd(), sys.argv, 0
    try:
        os.chdir(cwd)
        sys.argv = [command[2], *command[3:]]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per run, as in a fresh interpreter
            warnings.showwarning = show_on_stderr  # where the interpreter writes them, in order (pytest would keep them)
            try:
                runpy.run_module(command[2], run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if not isinstance(stop.code, (int, type(None))):
                    print(stop.code, file=sys.stderr)
            except BaseException:  # the interpreter hands it to sys.excepthook (voco's prints one sentence), exit 1
                sys.excepthook(*sys.exc_info())
                returncode = 1
    finally:
        os.chdir(previous_folder)
        sys.argv = previous_argv
        for logger in all_loggers():
            disabled, level, handlers, propagate = loggers.get(logger, (False, 0, [], True))
            logger.disabled, logger.level, logger.handlers, logger.propagate = disabled, level, handlers, propagate
    return subprocess.CompletedProcess(command, returncode, stdout.getvalue(), stderr.getvalue())


def smoke_run_with_mlflow(bundle: str, cwd: Path, *overrides: str, monai_tracking: bool = True):
    """The bundle's train + smoke configs, tracked into ``cwd/runs/mlflow.db`` as run "smoke" -> (tracking_uri, result):
    by MONAI's ``--tracking mlflow`` (the bundle's own handler stands back), or without it (the bundle's default)."""
    tracking_uri = tracking_store(cwd)
    tracking = ["--tracking", "mlflow"] if monai_tracking else []
    result = run_bundle_command(bundle, ["train.json", "smoke.json"], cwd, *tracking,
                                "--tracking_uri", tracking_uri, "--run_name", "smoke", *overrides)
    return tracking_uri, result


def smoke_run_and_resume(bundle: str, cwd: Path, *resume_overrides: str):
    """A smoke run (4 steps) tracked as "smoke" (`smoke_run_with_mlflow`), then the same command resumed to 6 steps
    -> (tracking_uri, first result, resumed result)."""
    tracking_uri, first = smoke_run_with_mlflow(bundle, cwd)
    resumed = run_bundle_command(bundle, ["train.json", "smoke.json"], cwd, "--run_name", "smoke", "--max_steps", "6",
                                 *resume_overrides)
    return tracking_uri, first, resumed


def torchrun_smoke_run(bundle: str, cwd: Path, run_name: str, *overrides: str):
    """The bundle's train + smoke + multi-GPU configs under `torchrun --standalone --nproc_per_node 2` on CPU
    (gloo), tracked by default into ``cwd/runs/mlflow.db`` as `run_name` -> (tracking_uri, result)."""
    import sys

    tracking_uri = tracking_store(cwd)
    (cwd / "tmp").mkdir(exist_ok=True)  # torchrun's and the ranks' temporary files stay in the test's folder
    environment = dict(os.environ, TMPDIR=str(cwd / "tmp"), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    # no --tracking mlflow, as the README's torchrun commands: the bundle tracks by default (rank 0)
    result = run_bundle_command(bundle, ["train.json", "smoke.json", "multi_gpu_train.json"], cwd,
                                "--tracking_uri", tracking_uri, "--run_name", run_name, *overrides,
                                launcher=[str(torchrun), "--standalone", "--nnodes", "1", "--nproc_per_node", "2"],
                                env=environment)
    return tracking_uri, result


def only_finished_run(tracking_uri: str, experiment_name: str, run_name: str = "smoke"):
    """The one MLflow run of an experiment, asserted to be named ``run_name`` and FINISHED -> (client, run)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    assert [run.info.run_name for run in runs] == [run_name]
    assert runs[0].info.status == "FINISHED"
    return client, runs[0]


def assert_png_artifacts(client, run, folder: Path, expected: list[str]) -> None:
    """The run's ``views/`` artifacts are exactly ``expected`` and each downloads as a PNG."""
    assert sorted(item.path for item in client.list_artifacts(run.info.run_id, "views")) == sorted(expected)
    for name in expected:
        local = Path(client.download_artifacts(run.info.run_id, name, str(folder)))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bundle_command(bundle: str, config_files: list[str], *overrides: str) -> list[str]:
    """The `python -m monai.bundle run` command line of bundles/<bundle> with these config files and overrides (for
    tests that start it with Popen, to signal or kill it while it runs)."""
    import sys

    folder = REPO_ROOT / "bundles" / bundle
    configs = "[" + ",".join(f"'{folder}/configs/{name}'" for name in config_files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(folder),
            "--logging_file", str(folder / "configs" / "logging.conf"), *overrides]


def write_volume(path: Path, array, spacing=(1.0, 1.0, 1.0)) -> str:
    """A float32 NIfTI volume with this voxel size -> its path."""
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def write_bad_volumes(folder: Path, seed: int = 0) -> list[str]:
    """Five volumes a run must survive, in this order: missing, truncated (header fine, voxels cut), 2-D, one NaN
    voxel, empty (a zero-length axis) -> their paths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.nii.gz"
    data = open(write_volume(truncated, rng.uniform(0, 1, (20, 20, 12))), "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    nan = rng.uniform(0, 1, (20, 20, 12))
    nan[3, 3, 3] = np.nan
    return [str(folder / "missing.nii.gz"), str(truncated),
            write_volume(folder / "flat.nii.gz", rng.uniform(0, 1, (20, 20))),
            write_volume(folder / "nan.nii.gz", nan),
            write_volume(folder / "empty.nii.gz", np.zeros((20, 0, 12)))]


def _gloo_rank(rank: int, world_size: int, port: int, worker, args: tuple, results) -> None:
    """One spawned process of `on_gloo_ranks`: join the gloo group, run the worker, send back its tensors."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        values = worker(rank, world_size, *args)
        # numpy: tensors would be shared through files that vanish with this process
        results.put((rank, [value.detach().numpy() for value in values]))
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(worker, *args, world_size: int = 2) -> dict:
    """`worker(rank, world_size, *args) -> tensors` in `world_size` spawned processes joined in one gloo group
    (a module-level function, so it pickles) -> {rank: [its tensors]}; asserts every process exited cleanly."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=_gloo_rank, args=(rank, world_size, port, worker, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    by_rank = {}
    for _ in range(world_size):
        rank, values = results.get()
        by_rank[rank] = [torch.from_numpy(value) for value in values]
    for process in processes:
        process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]
    return by_rank


def same_tensors(first: dict, second: dict) -> bool:
    """Two state dicts hold the same names and bitwise equal tensors."""
    import torch

    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def run_until_step_line(process, first_step: int, action) -> tuple[int, str]:
    """Read the run's output; at the first progress line of a step >= `first_step`, call `action(process)`; then
    wait for the end -> (exit code, output)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step ") and action is not None and int(line.split()[1].split("/")[0]) >= first_step:
            action(process)
            action = None
    return process.wait(timeout=600), "".join(lines)

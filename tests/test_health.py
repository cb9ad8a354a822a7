"""Collapse signals of a batch of embeddings (voco.health) and the one warning StepLogger prints for a collapsing run."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from ignite.engine import Engine

from voco.engine import StepLogger
from voco.health import COLLAPSE_STD_FRACTION, collapse_warning, embedding_health

WIDTH = 64


def spread_embeddings(count: int = 22, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def collapsed_embeddings(count: int = 22, width: int = WIDTH, noise: float = 1e-4) -> torch.Tensor:
    """One vector for every input, up to a little noise (complete collapse)."""
    return torch.ones(count, width) + noise * spread_embeddings(count, width, seed=1)


def test_spread_embeddings_look_healthy_and_the_values_are_exact():
    embeddings = 3.0 * spread_embeddings()  # the scale does not matter: the embeddings are L2-normalised first
    health = embedding_health(embeddings)
    assert set(health) == {"health/embedding_std", "health/top_component_share", "health/collapsed"}
    unit = F.normalize(embeddings, dim=-1).double()
    expected_std = unit.std(dim=0).mean()
    centred = unit - unit.mean(dim=0)
    variances = torch.linalg.eigvalsh(centred.T @ centred)  # the squared singular values, another way
    torch.testing.assert_close(health["health/embedding_std"].double(), expected_std, rtol=1e-5, atol=0)
    torch.testing.assert_close(health["health/top_component_share"].double(), variances[-1] / variances.sum(),
                               rtol=1e-4, atol=0)
    assert 0.9 / WIDTH ** 0.5 < health["health/embedding_std"] < 1.0 / WIDTH ** 0.5  # ~1/sqrt(D) on the sphere
    assert health["health/top_component_share"] < 0.2 and health["health/collapsed"].item() == 0.0
    assert all(value.dtype == torch.float32 and value.ndim == 0 for value in health.values())


def test_complete_and_dimensional_collapse_are_flagged():
    complete = embedding_health(collapsed_embeddings())
    assert complete["health/embedding_std"] < COLLAPSE_STD_FRACTION / WIDTH ** 0.5
    assert complete["health/collapsed"].item() == 1.0
    # Spread along one direction only: the std is large, the top component holds all the variance.
    base, direction = spread_embeddings(2, seed=2)
    line = base + torch.linspace(-0.5, 0.5, 22)[:, None] * direction  # normalised: a short arc, nearly a line
    dimensional = embedding_health(line)
    assert dimensional["health/embedding_std"] > COLLAPSE_STD_FRACTION / WIDTH ** 0.5
    assert dimensional["health/top_component_share"] > 0.95 and dimensional["health/collapsed"].item() == 1.0


def test_small_batches_non_finite_values_gradients_and_autocast():
    assert embedding_health(spread_embeddings(1)) == {}  # no spread of one vector
    two = embedding_health(spread_embeddings(2))
    assert set(two) == {"health/embedding_std", "health/collapsed"}  # two centred vectors always lie on one line
    broken = spread_embeddings(8)
    broken[3, 5] = float("nan")
    assert all(torch.isnan(value) for value in embedding_health(broken).values())  # no error: NaN, not collapsed
    embeddings = spread_embeddings(8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        health = embedding_health(embeddings.to(torch.bfloat16))
    assert all(value.dtype == torch.float32 and not value.requires_grad for value in health.values())
    torch.testing.assert_close(health["health/embedding_std"], embedding_health(embeddings)["health/embedding_std"],
                               rtol=1e-2, atol=0)  # bf16 inputs, float32 arithmetic
    assert embeddings.grad is None


def test_collapse_warning_names_the_values_and_the_task():
    values = {"loss": 1.0, "health/embedding_std": 0.002, "health/top_component_share": 0.98, "health/collapsed": 1.0}
    assert collapse_warning(values, 400) == (
        "warning: the embeddings are collapsing (std 0.002, top component 98 % of variance at step 400); try a lower "
        "learning rate, a larger batch, a higher teacher momentum, or check that the regions differ.")
    cyclic = {"health/mae/embedding_std": 0.01, "health/mae/collapsed": 0.0,
              "health/contrastive/embedding_std": 0.0005, "health/contrastive/collapsed": 1.0}
    assert collapse_warning(cyclic, 7).startswith(
        "warning: the contrastive task's embeddings are collapsing (std 0.0005 at step 7); try")
    assert collapse_warning({**values, "health/collapsed": 0.0}, 400) is None
    assert collapse_warning({"loss": 1.0}, 400) is None


def run_logger(outputs, max_steps: int = 100, interval: int = 10, **options) -> str:
    """What a StepLogger prints over a run whose step i (1-based) returns ``outputs(i)``."""
    stream = io.StringIO()
    engine = Engine(lambda engine, batch: [outputs(engine.state.iteration)])
    StepLogger(interval=interval, stream=stream, **options).attach(engine)
    engine.run(range(max_steps), max_epochs=1)
    return stream.getvalue()


def test_step_logger_warns_once_when_the_embeddings_stay_collapsed():
    collapsed = {"loss": torch.tensor(1.0), "volumes": 2, **embedding_health(collapsed_embeddings())}
    healthy = {"loss": torch.tensor(1.0), "volumes": 2, **embedding_health(spread_embeddings())}
    logged = {key: float(value) for key, value in collapsed.items()}  # what StepLogger reads from the device

    printed = run_logger(lambda step: collapsed)
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    # steps 10 and below are the first 10 % of the run (not judged); 20, 30, 40 are three logged steps in a row
    assert warnings == [collapse_warning(logged, 40)]
    assert f"(std {logged['health/embedding_std']:.3g}, top component" in warnings[0]
    assert printed.index("step 40/100") < printed.index("warning:") < printed.index("step 50/100")

    assert "warning:" not in run_logger(lambda step: healthy)
    # never three collapsed logged steps in a row: every third logged step is healthy
    assert "warning:" not in run_logger(lambda step: healthy if step % 30 == 0 else collapsed)
    assert run_logger(lambda step: collapsed, collapse_warmup=0.0, collapse_patience=1).count("warning:") == 1
    assert "at step 10);" in run_logger(lambda step: collapsed, collapse_warmup=0.0, collapse_patience=1)
    # a short run is all warm-up and patience: a smoke run of an untrained encoder says nothing
    assert "warning:" not in run_logger(lambda step: collapsed, max_steps=4, interval=2)


def test_progress_lines_give_the_share_the_rate_and_the_time_left():
    import re

    from voco.progress import format_duration

    printed = run_logger(lambda step: {"loss": torch.tensor(1.0), "volumes": 2})
    line = next(line for line in printed.splitlines() if line.startswith("step 50/100"))
    assert re.match(r"step 50/100  \(50\.0%, [0-9.e+]+ steps/s, ETA (\d+s|\d+m\d\ds)\)  loss 1 ", line), line
    assert [format_duration(seconds) for seconds in (0.4, 42, 418, 11220, 187200)] == [
        "0s", "42s", "6m58s", "3h07m", "2d04h"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_periodic_lines_in_a_log(monkeypatch):
    from voco.progress import Progress

    terminal = _Terminal()
    with Progress(4, "volumes read", stream=terminal) as progress:
        for _ in range(4):
            progress.update()
    frames = terminal.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[0].startswith("[######..................] 1/4 volumes read (25.0%, ")
    assert "ETA" in frames[0] and frames[-1].startswith("[" + "#" * 24 + "] 4/4 volumes read (100.0%")
    assert terminal.getvalue().endswith("\n")
    log = io.StringIO()  # a cluster log: one plain line per `every_s` seconds, none for work quicker than that
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("voco.progress.time.perf_counter", lambda: float(next(clock)))
    with Progress(5, "scans checked", stream=log, every_s=25) as progress:
        for _ in range(5):
            progress.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2, lines  # at 30 s (3 done), and the closing line
    assert lines[0].startswith("3/5 scans checked (60.0%, ") and "ETA" in lines[0]
    assert lines[1].startswith("5/5 scans checked (100.0%, ") and "ETA" not in lines[1]
    quiet = io.StringIO()
    with Progress(5, "scans checked", stream=quiet, minimum=200) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""


def test_manifest_build_shows_its_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    import nibabel as nib
    import numpy as np

    from voco.data import folder

    for index in range(3):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / f"case{index}.nii.gz"))
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(folder, "PROGRESS_MINIMUM", 1)
    records, _ = folder.scan_folder(tmp_path)
    assert len(records) == 3 and f"] 3/3 volumes read under {tmp_path.resolve()} (100.0%" in terminal.getvalue()


def test_memory_cache_fill_shows_its_bar_and_keeps_failed_volumes(monkeypatch):
    from monai import transforms as mt

    from voco.data import regions

    def load(item):
        if item["image"] == 2:
            raise ValueError("damaged")
        return {"image": torch.full((1, 2, 2, 2), float(item["image"]))}

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(regions, "CACHE_PROGRESS_MINIMUM", 1)
    dataset = regions.cached_dataset([{"image": index} for index in range(4)], mt.Compose([mt.Lambda(load)]), "memory",
                                     num_cache_workers=2)
    assert "] 4/4 volumes cached in memory (100.0%" in terminal.getvalue()
    assert float(dataset[3]["image"].max()) == 3.0 and isinstance(dataset._cache[2], regions._FailedVolume)


def test_step_logger_draws_a_bar_between_its_lines_on_a_terminal():
    terminal = _Terminal()
    engine = Engine(lambda engine, batch: [{"loss": torch.tensor(1.0), "volumes": 2}])
    StepLogger(interval=10, stream=terminal).attach(engine)
    engine.run(range(30), max_epochs=1)
    text = terminal.getvalue()
    frames = [part for part in text.split("\r") if part.startswith("[")]
    assert len(frames) == 29 and frames[0].startswith("[") and " 1/30 steps (3.3%, " in frames[0]
    lines = text.split("\n")
    logged = [line for line in lines if "step 10/30  (" in line or "step 30/30  (" in line]
    # the bar is taken off its line before each progress line: nothing of it is left on that line
    assert len(logged) == 2 and all(line.split("\r")[-1].startswith("\033[Kstep ") for line in logged)
    assert text.endswith("\r\033[K") or text.endswith("\n")
    assert "\r" not in run_logger(lambda step: {"loss": torch.tensor(1.0), "volumes": 2})  # a log file: lines only


def test_loader_workers_stay_within_this_process_share_of_the_cores(monkeypatch):
    import os

    from voco.distributed import loader_workers

    cores = len(os.sched_getaffinity(0))
    assert loader_workers(4) == min(4, cores) and loader_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more processes per node than cores: one worker each
    assert loader_workers(4) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(4) == 4 and loader_workers(16) == 8

"""The benchmark grid and its report: planning cells, running them resumably against a real (embedded) MLflow store,
reading the finished runs back, summarising over seeds beside the published numbers, and writing the report."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import statistics
from types import SimpleNamespace

import pytest
from conftest import tracking_store

from voco.benchmark.registry import get_task
from voco.benchmark.report import collect_results, format_markdown, summarize, write_report
from voco.benchmark.runs import Cell, finished_cells, parse_dataset_dirs, parse_list, plan_grid, run_grid
from voco.cli import main
from voco.errors import ConfigError


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh embedded store; $MLFLOW_TRACKING_URI would take priority over it, so it is removed."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "runs").mkdir()
    return tracking_store(tmp_path)


def record_run(tracking_uri: str, cell: Cell, best: float | None, status: str = "FINISHED",
               run_name: str | None = None, grid_settings: str | None = None) -> str:
    """What one fine-tuning run of the bundle leaves in MLflow: a run named after the cell in benchmark-<task>, the
    cell's voco.* tags (with the grid settings the grid gave, where given) and best/metric/dice (no best/ metric
    where `best` is None); returns the run id."""
    import mlflow

    from voco.benchmark.cells import encoder_name
    from voco.tracking import prepare_experiment

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_id = prepare_experiment(tracking_uri, f"benchmark-{cell.task}")
    run = client.create_run(experiment_id, run_name=run_name or cell.run_name)
    run_id = run.info.run_id
    client.log_metric(run_id, "metric/dice", 0.5, step=1)
    if best is not None:
        client.log_metric(run_id, "best/metric/dice", best, step=2)
    tags = {"task": cell.task, "pretrained": cell.pretrained, "encoder": encoder_name(cell.pretrained),
            "mode": cell.mode, "backbone": cell.backbone, "size": cell.size, "seed": cell.seed,
            "training_cases": cell.training_cases, "max_epochs": 2, "key_metric": "metric/dice"}
    if grid_settings:
        tags["grid_settings"] = grid_settings
    for key, value in tags.items():
        client.set_tag(run_id, f"voco.{key}", str(value))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


class RecordingRunner:
    """A runner that does what the bundle does to the store (a real MLflow run), and remembers what it ran."""

    def __init__(self, tracking_uri: str, fail: set[str] = frozenset(), best: float = 0.8) -> None:
        self.tracking_uri, self.fail, self.best = tracking_uri, set(fail), best
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, cell: Cell, settings: dict) -> None:
        self.calls.append((settings.get("run_name", cell.run_name), settings))
        if cell.run_name in self.fail:
            record_run(self.tracking_uri, cell, None, status="RUNNING")  # what a crash leaves behind
            try:
                raise ConfigError(f"the dataset of {cell.task} is missing; give --dataset_dir.")
            except ConfigError as error:
                raise RuntimeError("Failed to instantiate the trainer\nlong MONAI trace") from error
        record_run(self.tracking_uri, cell, self.best + 0.01 * cell.seed, run_name=settings.get("run_name"),
                   grid_settings=settings.get("grid_settings"))


# --------------------------------------------------------------------------------------------------------------
# Planning


def test_plan_grid_crosses_tasks_encoders_modes_and_seeds():
    cells = plan_grid(["BTCV", "msd-task09-spleen"], ["/ckpt/a.pt", "b.pt", "scratch"], seeds=(0, 1, 2))
    assert len(cells) == 2 * 3 * 3
    assert {cell.task for cell in cells} == {"btcv", "msd-task09-spleen"}  # the registry's spelling
    assert {(cell.pretrained, cell.mode) for cell in cells} == {("/ckpt/a.pt", "finetune"), ("b.pt", "finetune"),
                                                                ("scratch", "scratch")}
    assert cells[0] == Cell("btcv", "/ckpt/a.pt", "finetune", 0, "swin", "B", None)
    assert cells[0].run_name == "btcv-a-finetune-swin_B-seed0"
    assert len({cell.run_name for cell in cells}) == len(cells)

    modes = plan_grid(["btcv"], ["a.pt", "scratch"], seeds=["0", "1"], modes=("finetune", "frozen", "linear_probe"),
                      size="L", training_cases=5)
    assert len(modes) == (3 + 1) * 2  # scratch gets only the mode scratch
    assert sorted({cell.mode for cell in modes}) == ["finetune", "frozen", "linear_probe", "scratch"]
    assert {cell.seed for cell in modes} == {0, 1}
    assert "btcv-a-linear_probe-swin_L-5cases-seed1" in {cell.run_name for cell in modes}
    assert plan_grid(["btcv"], ["scratch", "scratch"], seeds=(0, 0)) == [Cell("btcv", "scratch", "scratch", 0)]
    # registration cells are planned too (the runner adds the registration.json override for them)
    assert [cell.task for cell in plan_grid(["ixi", "phantom-reg"], ["scratch"])] == ["ixi", "phantom-reg"]


@pytest.mark.parametrize("arguments, words", [
    ((["btvc"], ["scratch"]), "did you mean 'btcv'"),
    ((["ctrg-chest-report-gen"], ["scratch"]), "not runnable"),
    ((["btcv"], ["/one/model.pt", "/two/model.pt"]), "rename one"),
    ((["btcv"], []), "no pretrained"),
])
def test_plan_grid_refuses_what_cannot_run(arguments, words):
    with pytest.raises(ConfigError, match=words):
        plan_grid(*arguments)


def test_plan_grid_refuses_bad_modes_and_seeds():
    with pytest.raises(ConfigError, match="adding 'scratch' to the pretrained list"):
        plan_grid(["btcv"], ["a.pt"], modes=["scratch"])
    with pytest.raises(ConfigError, match="whole number"):
        plan_grid(["btcv"], ["a.pt"], seeds=["first"])


def test_command_line_lists_and_dataset_folders():
    assert parse_list("btcv,msd-task09-spleen") == ["btcv", "msd-task09-spleen"]
    assert parse_list(("a.pt", "scratch")) == ["a.pt", "scratch"]
    assert parse_list((0, 1, 2)) == ["0", "1", "2"] and parse_list(0) == ["0"] and parse_list(None) == []
    assert parse_dataset_dirs("/data/BTCV") == "/data/BTCV"
    assert parse_dataset_dirs("btcv=/data/BTCV,msd-task09-spleen=/data/spleen") == {
        "btcv": "/data/BTCV", "msd-task09-spleen": "/data/spleen"}
    assert parse_dataset_dirs(None) is None
    with pytest.raises(ConfigError, match="task=folder"):
        parse_dataset_dirs("/a,/b")


# --------------------------------------------------------------------------------------------------------------
# Running


def test_run_grid_runs_each_cell_once_and_resumes(tracking_uri, tmp_path, capsys):
    checkpoint = tmp_path / "VoCo_B.pt"
    checkpoint.write_bytes(b"weights")
    cells = plan_grid(["btcv", "phantom-seg"], [str(checkpoint), "scratch"], seeds=(0, 1))
    record_run(tracking_uri, cells[1], 0.9)  # finished before the grid started
    runner = RecordingRunner(tracking_uri)
    rows = run_grid(cells, dataset_dirs={"btcv": tmp_path / "BTCV", "Phantom-Seg": str(tmp_path / "phantoms")},
                    tracking_uri=tracking_uri, overrides={"max_epochs": 3}, runner=runner)
    out = capsys.readouterr().out
    assert [row["status"] for row in rows] == ["done", "skipped"] + ["done"] * 6
    assert [row["cell"] for row in rows] == cells
    assert len(runner.calls) == 7
    assert f"[1/8] {cells[0].run_name}" in out and f"[2/8] skip {cells[1].run_name}: finished" in out
    assert "grid: 7 done, 1 skipped" in out
    assert re.search(rf"\[1/8\] done {cells[0].run_name} in \d+ s; 7 cells left, about \d+s at this pace", out)
    assert re.search(rf"\[8/8\] done {cells[7].run_name} in \d+ s\n", out)  # the last: nothing left to estimate
    name, settings = runner.calls[0]
    assert name == cells[0].run_name
    recorded = json.loads(settings.pop("grid_settings"))  # what decides whether a finished run is this cell
    assert settings == {"task": "btcv", "pretrained": str(checkpoint.resolve()), "mode": "finetune",
                        "backbone": "swin", "size": "B", "seed": 0, "training_cases": None,
                        "tracking_uri": tracking_uri, "max_epochs": 3, "dataset_dir": str(tmp_path / "BTCV")}
    assert recorded == {"configs": ["train.json"], "max_epochs": 3,
                        "encoder_sha256": hashlib.sha256(b"weights").hexdigest()}
    assert runner.calls[-1][1]["dataset_dir"] == str(tmp_path / "phantoms")
    assert finished_cells(tracking_uri) == {cell.run_name for cell in cells}

    again = run_grid(cells, dataset_dirs=None, tracking_uri=tracking_uri, overrides={"max_epochs": 3},
                     runner=runner)  # nothing left to run
    assert [row["status"] for row in again] == ["skipped"] * 8
    assert len(runner.calls) == 7
    assert capsys.readouterr().out.count(": finished") == 8


def test_a_finished_cell_counts_only_with_the_same_settings(tracking_uri, tmp_path, capsys):
    """Issue 17 item 3: ``--max_epochs 100`` after a 20-epoch run did nothing; another encoder file under the same
    name too. The cell runs again, under its name with a suffix, and the grid says why."""
    checkpoint = tmp_path / "encoder.pt"
    checkpoint.write_bytes(b"weights")
    cells = plan_grid(["phantom-seg"], [str(checkpoint)], seeds=(0,))
    runner = RecordingRunner(tracking_uri)
    assert [row["status"] for row in run_grid(cells, dataset_dirs=None, tracking_uri=tracking_uri,
                                              overrides={"max_epochs": 20}, runner=runner)] == ["done"]
    capsys.readouterr()
    rows = run_grid(cells, dataset_dirs=None, tracking_uri=tracking_uri, overrides={"max_epochs": 100}, runner=runner)
    out = capsys.readouterr().out
    name, settings = runner.calls[-1]
    assert [row["status"] for row in rows] == ["done"] and len(runner.calls) == 2
    assert name.startswith(cells[0].run_name + "-") and settings["run_name"] == name
    assert f"[1/1] {cells[0].run_name} finished with other settings (max_epochs 20 there, 100 here): running it " \
           f"as {name}" in out
    # the same again: finished; another encoder file: runs, naming the difference
    assert [row["status"] for row in run_grid(cells, dataset_dirs=None, tracking_uri=tracking_uri,
                                              overrides={"max_epochs": 100}, runner=runner)] == ["skipped"]
    checkpoint.write_bytes(b"other weights")
    capsys.readouterr()
    run_grid(cells, dataset_dirs=None, tracking_uri=tracking_uri, overrides={"max_epochs": 100}, runner=runner)
    assert len(runner.calls) == 3 and "encoder_sha256 " in capsys.readouterr().out


def test_a_failing_cell_is_reported_and_the_grid_goes_on(tracking_uri, capsys):
    import mlflow

    cells = plan_grid(["phantom-seg"], ["scratch"], seeds=(0, 1, 2))
    runner = RecordingRunner(tracking_uri, fail={cells[1].run_name})
    rows = run_grid(cells, dataset_dirs="/data", tracking_uri=tracking_uri, runner=runner)
    assert [row["status"] for row in rows] == ["done", "failed", "done"]
    # one line, the user's error rather than the wrapper's
    assert rows[1]["error"] == "the dataset of phantom-seg is missing; give --dataset_dir."
    assert f"[2/3] failed {cells[1].run_name}: the dataset of phantom-seg is missing" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("benchmark-phantom-seg")
    statuses = {run.info.run_name: run.info.status for run in client.search_runs([experiment.experiment_id])}
    assert statuses[cells[1].run_name] == "FAILED"  # not left RUNNING
    assert finished_cells(tracking_uri) == {cells[0].run_name, cells[2].run_name}

    runner.fail.clear()  # the same grid again: only the failed cell runs
    rows = run_grid(cells, dataset_dirs="/data", tracking_uri=tracking_uri, runner=runner)
    assert [row["status"] for row in rows] == ["skipped", "done", "skipped"]
    assert [name for name, _ in runner.calls] == [cell.run_name for cell in cells] + [cells[1].run_name]


def test_a_run_the_store_does_not_hold_is_not_done(tracking_uri, capsys):
    cells = plan_grid(["phantom-seg"], ["scratch"])
    rows = run_grid(cells, dataset_dirs="/data", tracking_uri=tracking_uri, runner=lambda cell, settings: None)
    assert rows[0]["status"] == "failed" and "holds no FINISHED run named" in rows[0]["error"]


def test_run_grid_checks_folders_and_checkpoints_before_running(tracking_uri, tmp_path):
    runner = RecordingRunner(tracking_uri)
    with pytest.raises(ConfigError, match="no dataset folder is given for the task 'phantom-seg'"):
        run_grid(plan_grid(["btcv", "phantom-seg"], ["scratch"]), dataset_dirs={"btcv": tmp_path},
                 tracking_uri=tracking_uri, runner=runner)
    with pytest.raises(ConfigError, match="missing.pt does not exist"):
        run_grid(plan_grid(["btcv"], ["scratch", str(tmp_path / "missing.pt")]), dataset_dirs=tmp_path,
                 tracking_uri=tracking_uri, runner=runner)
    with pytest.raises(ConfigError, match="no config 'nightly.json'"):
        run_grid(plan_grid(["btcv"], ["scratch"]), dataset_dirs=tmp_path, tracking_uri=tracking_uri,
                 config_files=("train.json", "nightly.json"))
    assert runner.calls == []


# --------------------------------------------------------------------------------------------------------------
# Reporting


@pytest.fixture
def results_store(tracking_uri):
    """btcv: VoCo_B fine-tuned with 3 seeds, scratch with 2; phantom-seg: scratch with 1 seed; plus runs the report
    must leave out (still running, finished without a best/ metric)."""
    bests = {("btcv", "/w/VoCo_B.pt", "finetune"): [0.80, 0.82, 0.85], ("btcv", "scratch", "scratch"): [0.70, 0.74],
             ("phantom-seg", "scratch", "scratch"): [0.42]}
    for (task, pretrained, mode), values in bests.items():
        for seed, best in enumerate(values):
            record_run(tracking_uri, Cell(task, pretrained, mode, seed), best)
    record_run(tracking_uri, Cell("btcv", "/w/VoCo_B.pt", "frozen", 0), 0.5, status="RUNNING")
    record_run(tracking_uri, Cell("btcv", "/w/VoCo_B.pt", "linear_probe", 0), None)
    return tracking_uri, bests


def test_collect_and_summarize_against_the_published_number(results_store):
    tracking_uri, bests = results_store
    rows = collect_results(tracking_uri)
    assert len(rows) == 6
    first = next(row for row in rows if row["encoder"] == "VoCo_B" and row["seed"] == 1)
    assert {key: first[key] for key in ("task", "encoder", "mode", "backbone", "size", "seed", "training_cases",
                                        "key_metric", "best")} == {
        "task": "btcv", "encoder": "VoCo_B", "mode": "finetune", "backbone": "swin", "size": "B", "seed": 1,
        "training_cases": None, "key_metric": "metric/dice", "best": pytest.approx(0.82)}
    assert {row["task"] for row in collect_results(tracking_uri, tasks=["phantom-seg"])} == {"phantom-seg"}

    summary = summarize(rows)
    assert [(row["task"], row["encoder"]) for row in summary] == [("btcv", "VoCo_B"), ("btcv", "scratch"),
                                                                   ("phantom-seg", "scratch")]
    voco, scratch, phantom = summary
    # the registry's best VoCo number for BTCV, found by hand
    values = get_task("btcv").reference_results["values"]
    method = max((name for name in values if name.lower().startswith("voco")), key=values.get)
    assert (method, values[method]) == ("VoCo (size not stated)", 86.64)
    assert voco["n"] == 3 and voco["seeds"] == [0, 1, 2]
    assert voco["mean"] == pytest.approx((80 + 82 + 85) / 3)
    mean = (80 + 82 + 85) / 3
    assert voco["std"] == pytest.approx((((80 - mean) ** 2 + (82 - mean) ** 2 + (85 - mean) ** 2) / 2) ** 0.5)
    assert voco["reference"] == 86.64 and voco["reference_method"] == method
    assert voco["difference"] == pytest.approx(mean - 86.64)
    assert scratch["mean"] == pytest.approx(72.0) and scratch["std"] == pytest.approx(statistics.stdev([70, 74]))
    assert scratch["reference"] == 86.64
    assert phantom["n"] == 1 and phantom["std"] is None and phantom["reference"] is None
    assert phantom["difference"] is None

    # a seed run twice counts once, with its latest value
    rerun = summarize(rows + [{**first, "best": 0.90, "start_time": first["start_time"] + 1}])
    assert rerun[0]["n"] == 3 and rerun[0]["mean"] == pytest.approx((80 + 90 + 85) / 3)


def test_write_report_files(results_store, tmp_path):
    tracking_uri, _ = results_store
    summary = summarize(collect_results(tracking_uri))
    paths = write_report(summary, tmp_path / "results")
    assert {path.name for path in (tmp_path / "results").iterdir()} == {"results.csv", "results.md", "results.png"}
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [(row["task"], row["encoder"], row["n"]) for row in table] == [("btcv", "VoCo_B", "3"),
                                                                           ("btcv", "scratch", "2"),
                                                                           ("phantom-seg", "scratch", "1")]
    assert float(table[0]["mean"]) == pytest.approx(82.3333, abs=1e-3)
    assert table[0]["reference"] == "86.6400" and table[0]["reference_method"] == "VoCo (size not stated)"
    assert float(table[0]["difference"]) == pytest.approx(82.3333 - 86.64, abs=1e-3)
    assert table[2]["std"] == "" and table[2]["reference"] == ""
    markdown = paths["markdown"].read_text()
    assert markdown == format_markdown(summary)
    lines = markdown.splitlines()
    assert lines[0].startswith("| task | encoder | mode |") and lines[1].startswith("|---|")
    assert lines[2] == ("| btcv | VoCo_B | finetune | swin-B | all | Dice | 3 | 82.33 ± 2.52 | 86.64 | "
                        "VoCo (size not stated) | -4.31 |  |")
    assert lines[4] == "| phantom-seg | scratch | scratch | swin-B | all | Dice | 1 | 42.00 | n/a | - | - |  |"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command(results_store, tmp_path, capsys):
    tracking_uri, _ = results_store
    code = main(["benchmark", "report", "--out", str(tmp_path / "out"), "--tracking_uri", tracking_uri,
                 "--tasks", "btcv"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| btcv | VoCo_B | finetune |" in out and "phantom-seg" not in out
    assert (tmp_path / "out" / "results.png").is_file()

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["benchmark", "report", "--out", str(tmp_path / "none"), "--tracking_uri", empty]) == 2
    assert "holds no finished benchmark runs" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------------------------------------------
# End to end: the real bundle (about a minute on two CPU cores)


def test_grid_runs_the_smoke_bundle_and_report_shows_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    tracking_uri = tracking_store(tmp_path)
    cells = plan_grid(["phantom-seg"], ["scratch"], seeds=(0,), size="tiny")
    settings = dict(dataset_dirs=None, tracking_uri=tracking_uri, config_files=("train.json", "smoke.json"),
                    overrides={"max_epochs": 1})
    rows = run_grid(cells, **settings)
    assert [row["status"] for row in rows] == ["done"], rows
    assert (tmp_path / "runs" / "benchmark" / cells[0].run_name / "result.json").is_file()
    assert [row["status"] for row in run_grid(cells, **settings)] == ["skipped"]  # the bundle's name is the cell's

    capsys.readouterr()
    assert main(["benchmark", "report", "--tracking_uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "| phantom-seg | scratch | scratch | swin-tiny | all | Dice | 1 |" in out
    assert (tmp_path / "results" / "results.md").is_file()


class NaNLossFrom:
    """A loss that is NaN from the given (1-based) call on: a pretrained file full of NaN or a diverged learning
    rate, as the fine-tuning trainer sees it."""

    def __init__(self, first_bad: int) -> None:
        self.first_bad, self.calls = first_bad, 0

    def __call__(self, prediction, target):
        import torch

        self.calls += 1
        loss = torch.nn.functional.mse_loss(prediction, target)
        return loss * float("nan") if self.calls >= self.first_bad else loss


def test_fine_tuning_skips_non_finite_steps_and_stops_without_a_result(tmp_path):
    """Issue 16 item 5: a NaN loss never reaches the weights; `max_bad_steps` of them in a row end the run with an
    error before COMPLETED, so BenchmarkRecord writes no result (the grid reports the cell failed)."""
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from voco.benchmark.finetune import BenchmarkRecord, NonFiniteLossError, NonFiniteLossGuard

    torch.manual_seed(0)
    network = torch.nn.Linear(4, 1)
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(12)]
    trainer = SupervisedTrainer("cpu", max_epochs=1, train_data_loader=data, network=network,
                                optimizer=torch.optim.AdamW(network.parameters(), lr=0.1),
                                loss_function=NaNLossFrom(3))
    NonFiniteLossGuard(max_bad_steps=4).attach(trainer)
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"metric/dice": 0.0}))  # what BenchmarkRecord reads
    BenchmarkRecord(evaluator, tmp_path, {"task": "t"}).attach(trainer)
    weights = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: weights.__setitem__(engine.state.iteration, network.weight.clone()))

    with pytest.raises(NonFiniteLossError, match=r"^fine-tuning stopped at step 6: the loss was NaN or infinite in 4 "
                                                 r"steps in a row; lower --learning_rate"):
        trainer.run()
    assert trainer.state.skipped_steps == 4
    assert not torch.equal(weights[1], weights[2])  # finite steps train
    assert all(torch.equal(weights[step], weights[2]) for step in (3, 4, 5))  # NaN steps leave the weights alone
    assert bool(torch.isfinite(network.weight).all())
    assert not (tmp_path / "result.json").exists()


def test_the_guard_refuses_a_limit_below_one():
    from voco.benchmark.finetune import NonFiniteLossGuard

    with pytest.raises(ConfigError, match="max_bad_steps must be at least 1"):
        NonFiniteLossGuard(0)


def test_validation_picture_keeps_the_best_epochs_case(tmp_path):
    """Drawn after the first validation and after each that improves the key metric; a worse epoch leaves the
    best epoch's picture in place. Radiological convention with orientation letters (`show_axial`)."""
    import torch
    from ignite.engine import Engine

    from voco.benchmark.finetune import ValidationPicture

    label = torch.zeros(2, 8, 8, 4)
    label[0], label[1, 2:5, 2:5, 1:3], label[0, 2:5, 2:5, 1:3] = 1, 1, 0
    case = {"image": torch.rand(1, 8, 8, 4), "label": label, "pred": label}
    engine = Engine(lambda engine, batch: None)
    picture = ValidationPicture(tmp_path, get_task("phantom-seg"))
    path = tmp_path / "validation_case.png"
    drawn = []
    for epoch, best_epoch in [(1, -1), (2, 2), (3, 2), (4, 4)]:  # epoch 1 scores NaN: MONAI keeps best epoch -1
        engine.state.epoch, engine.state.output, engine.state.best_metric_epoch = epoch, [case], best_epoch
        engine.state.metrics = {"metric/dice": 0.5}
        drawn.append(picture(engine) is not None)
    assert drawn == [True, True, False, True] and picture.drawn_epoch == 4
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The VoCo bundle end to end through `python -m monai.bundle run`, as a user runs it: smoke settings on
phantoms it generates itself, MLflow tracking into an embedded store, checkpoints, resume and export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import (assert_png_artifacts, only_finished_run, run_bundle_command, smoke_run_with_mlflow,
                      torchrun_smoke_run)


def run_bundle(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_bundle_command("voco_pretrain", ["train.json", "smoke.json"], cwd, *overrides)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (4 steps) with MLflow tracking, then the same command resumed to 6 steps."""
    cwd = tmp_path_factory.mktemp("bundle")
    tracking_uri, first = smoke_run_with_mlflow("voco_pretrain", cwd)
    resumed = run_bundle(cwd, "--run_name", "smoke", "--max_steps", "6")
    return cwd, tracking_uri, first, resumed


def test_smoke_run_trains_and_logs_into_mlflow(smoke_run):
    cwd, tracking_uri, first, _ = smoke_run
    assert "step 4/4" in first.stdout
    client, run = only_finished_run(tracking_uri, "voco_pretrain")
    for name in ["loss", "loss/intra", "loss/inter", "loss/regularization", "metric/position_mae",
                 "metric/position_top1", "lr", "teacher_momentum", "throughput/volumes_per_s",
                 "data/skipped_volumes", "val/metric/position_mae", "val/metric/position_top1"]:
        assert name in run.data.metrics, name
    history = client.get_metric_history(run.info.run_id, "loss")
    # the resumed command (to 6 steps) goes on in the same MLflow run, not in a second one of the same name
    assert [point.step for point in history] == [2, 4, 6]
    assert run.data.metrics["data/skipped_volumes"] == 0
    assert 0.0 <= run.data.metrics["metric/position_top1"] <= 1.0
    # the frozen-encoder probe: at step 0 (the untrained encoder) and at every validation interval
    assert [point.step for point in client.get_metric_history(run.info.run_id, "probe/dice_at_init")] == [0]
    assert [point.step for point in client.get_metric_history(run.info.run_id, "probe/dice")][:2] == [0, 4]
    assert 0.0 < run.data.metrics["probe/dice"] < 1.0 and "probe/dice/liver" in run.data.metrics
    assert_png_artifacts(client, run, cwd, ["views/views.png"])
    # artifacts live beside the embedded store, not in a ./mlruns of the working folder
    assert (cwd / "runs" / "artifacts").is_dir() and not (cwd / "mlruns").exists()


def test_checkpoints_resume_and_export(smoke_run, tmp_path):
    import torch
    from monai.networks.nets import SwinUNETR

    from voco.checkpoints import export_encoder, load_encoder_weights, read_checkpoint

    cwd, _, _, resumed = smoke_run
    checkpoints = cwd / "runs" / "smoke" / "checkpoints"
    names = sorted(path.name for path in checkpoints.glob("*.pt"))
    assert "checkpoint_final.pt" in names
    # the second command found the first run's checkpoint and went on from step 4, not from 0
    assert "step 6/6" in resumed.stdout and "step 2/6" not in resumed.stdout
    state = read_checkpoint(checkpoints / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6
    # what the run was pretrained on, for the export's provenance (leakage check, preprocessing plan)
    facts = json.loads((cwd / "runs" / "smoke" / "pretraining.json").read_text())
    assert Path(facts["manifest"]).is_file() and facts["backbone"]["size"] == "tiny"
    assert set(facts) == {"manifest", "dataset_dir", "preset", "region_size", "backbone", "channels", "plan"}
    assert facts["plan"]["backbone"]["name"] == "swin" and facts["plan"]["region_size"] == facts["region_size"]
    assert state["backbone_spec"]["size"] == "tiny"
    out, count = export_encoder(checkpoints / "checkpoint_final.pt", tmp_path / "encoder.pt")
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True, window_size=2)  # as smoke.json
    report = load_encoder_weights(model, out)
    assert report.loaded_fraction == 1.0 and len(report.loaded) == count
    exported = torch.load(out, weights_only=True)
    trained = state["pretext"]
    assert all(torch.equal(exported[key], trained[f"backbone.{key}"]) for key in exported)


TORCHRUN_STEPS = 8


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """`torchrun --nproc_per_node 2` with the multi-GPU overrides on CPU (gloo), 8 steps with a checkpoint after each:
    the run the next two tests look at, and the uninterrupted reference of the stopped one."""
    cwd = tmp_path_factory.mktemp("torchrun")
    tracking_uri, result = torchrun_smoke_run("voco_pretrain", cwd, "two-ranks", "--max_steps", str(TORCHRUN_STEPS),
                                              "--checkpoint_interval", "1", "--log_interval", "1")
    return cwd, tracking_uri, result


def test_torchrun_two_processes_on_cpu(torchrun_run):
    """One MLflow run, one checkpoint set, progress from rank 0 only."""
    import mlflow

    cwd, tracking_uri, result = torchrun_run
    assert result.stdout.count(f"step {TORCHRUN_STEPS}/{TORCHRUN_STEPS}") == 1  # progress from rank 0 only
    log = result.stdout + result.stderr  # each rank reads only its part of the 3 training phantoms (one repeated)
    assert all(f"rank {rank} of 2 trains on its shard: 2 of the 3 volumes" in log for rank in (0, 1))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("voco_pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_name for run in runs] == ["two-ranks"] and runs[0].info.status == "FINISHED"
    assert "loss" in runs[0].data.metrics
    checkpoints = sorted(path.name for path in (cwd / "runs" / "two-ranks" / "checkpoints").glob("*.pt"))
    assert "checkpoint_final.pt" in checkpoints


def test_a_torchrun_job_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(torchrun_run):
    """Two ranks (gloo): SIGTERM to torchrun (which forwards it to its workers) at a step -> every rank stops after
    the same step, rank 0 writes the checkpoint; the same command then finishes with the weights of the job above,
    which was never stopped."""
    import os
    import signal
    import sys

    from conftest import bundle_command, run_until_step_line, same_tensors

    from voco.checkpoints import read_checkpoint

    cwd, _, _ = torchrun_run
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    environment = dict(os.environ, TMPDIR=str(cwd / "tmp"), OMP_NUM_THREADS="1")

    def start(run_name: str) -> subprocess.Popen:
        command = bundle_command("voco_pretrain", ["train.json", "smoke.json", "multi_gpu_train.json"],
                                 "--max_steps", str(TORCHRUN_STEPS), "--checkpoint_interval", "1", "--log_interval",
                                 "1", "--run_name", run_name)
        return subprocess.Popen(torchrun + command[1:], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    code, out = run_until_step_line(start("chain"), 2, lambda process: process.send_signal(signal.SIGTERM))
    stopped_line = next(line for line in out.splitlines() if line.startswith("stopped after step"))
    step = int(stopped_line.split()[3])
    assert code != 0 and step < TORCHRUN_STEPS, out[-3000:]
    code, out = run_until_step_line(start("chain"), 0, None)
    assert code == 0 and f"step {TORCHRUN_STEPS}/{TORCHRUN_STEPS}" in out, out[-3000:]
    reference = read_checkpoint(cwd / "runs" / "two-ranks" / "checkpoints" / "checkpoint_final.pt")
    resumed = read_checkpoint(cwd / "runs" / "chain" / "checkpoints" / "checkpoint_final.pt")
    assert same_tensors(resumed["pretext"], reference["pretext"]), f"stopped after step {step}"

"""The downstream benchmark bundle through `python -m monai.bundle run`: fine-tune the phantom segmentation task
from a pretrained encoder (smoke settings), then evaluate the best checkpoint and predict label maps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_bundle_command, tracking_store



def run_bundle(cwd: Path, extra_config: str | None, *overrides: str) -> subprocess.CompletedProcess:
    configs = ["train.json", "smoke.json"] + ([extra_config] if extra_config else [])
    return run_bundle_command("downstream_benchmark", configs, cwd, *overrides)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    import torch

    from voco.networks import build_backbone

    cwd = tmp_path_factory.mktemp("downstream")
    encoder = build_backbone("swin", "tiny", window_size=2)  # the smoke network: feature size 12, window 2
    torch.save(encoder.state_dict(), cwd / "tiny_encoder.pt")
    tracking_uri = tracking_store(cwd)
    trained = run_bundle(cwd, None, "--pretrained", str(cwd / "tiny_encoder.pt"), "--max_epochs", "1",
                         "--tracking", "mlflow", "--tracking_uri", tracking_uri, "--run_name", "cell")
    return cwd, tracking_uri, trained


def test_finetune_from_a_pretrained_encoder_logs_the_task_metrics(finetuned):
    import mlflow

    cwd, tracking_uri, trained = finetuned
    output = trained.stdout + trained.stderr
    assert "loaded 145/145 encoder tensors" in output  # the key report of the encoder load
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("benchmark-phantom-seg")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "cell" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ["metric/dice", "metric/dice/liver", "metric/dice/lesion", "best/metric/dice", "train_loss"]:
        assert name in metrics, name
    assert 0.0 <= metrics["best/metric/dice"] <= 1.0
    assert run.data.tags["voco.mode"] == "finetune" and run.data.tags["voco.encoder"] == "tiny_encoder"
    folder = cwd / "runs" / "benchmark" / "cell"
    assert (folder / "checkpoints" / "model.pt").is_file()
    result = json.loads((folder / "result.json").read_text())
    assert result["key_metric"] == "metric/dice" and result["best"] == pytest.approx(metrics["best/metric/dice"])
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "validation")]
    assert artifacts == ["validation/validation_case.png"]


def test_evaluate_and_predict_with_the_best_checkpoint(finetuned):
    import nibabel as nib

    cwd, _, _ = finetuned
    run_bundle(cwd, "evaluate.json", "--pretrained", str(cwd / "tiny_encoder.pt"), "--run_name", "cell")
    metrics_file = cwd / "runs" / "benchmark" / "cell" / "evaluation" / "metrics.csv"
    assert "metric/dice" in metrics_file.read_text()
    run_bundle(cwd, "inference.json", "--pretrained", str(cwd / "tiny_encoder.pt"), "--run_name", "cell")
    # without the training's settings the run folder is another one: one sentence, before any volume is cached
    import subprocess

    from conftest import bundle_command

    lost = subprocess.run(bundle_command("downstream_benchmark", ["train.json", "evaluate.json"], "--task",
                                         "phantom-seg"), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert lost.returncode == 1
    last = lost.stderr.strip().splitlines()[-1]
    assert last.startswith("error: there is no trained model ") and "model.pt (" in last
    assert "holds the trained runs cell); evaluate and inference find the run from the settings" in last
    assert "Traceback" not in lost.stderr
    predictions = sorted((cwd / "runs" / "benchmark" / "cell" / "predictions").glob("*_seg.nii.gz"))
    datalist = json.loads((cwd / "runs" / "phantom_tasks" / "phantom-seg" / "phantom_seg.json").read_text())
    assert len(predictions) == len(datalist["validation"]) == 2
    for prediction in predictions:  # inverted onto the grid of the original file
        name = prediction.name.replace("_seg.nii.gz", ".nii.gz")
        original = nib.load(next((cwd / "runs" / "phantom_tasks" / "phantom-seg").rglob(name)))
        assert nib.load(prediction).shape[:3] == original.shape[:3]


def test_torchrun_two_processes_on_cpu(tmp_path):
    """The multi-GPU overrides under `torchrun --nproc_per_node 2` on CPU (gloo): metrics gathered, one MLflow run."""
    import os

    import mlflow

    tracking_uri = tracking_store(tmp_path)
    (tmp_path / "tmp").mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    run_bundle_command("downstream_benchmark", ["train.json", "smoke.json", "multi_gpu_train.json"], tmp_path,
                       "--max_epochs", "1", "--tracking", "mlflow", "--tracking_uri", tracking_uri,
                       launcher=[str(torchrun), "--standalone", "--nnodes", "1", "--nproc_per_node", "2"],
                       env=dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1"))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark-phantom-seg").experiment_id])
    assert run.info.status == "FINISHED" and "best/metric/dice" in run.data.metrics
    assert list((tmp_path / "runs" / "benchmark").glob("*/checkpoints/model.pt"))


def test_classification_task_through_the_bundle(tmp_path):
    """phantom-cls (lesion or not): the encoder-classifier, BCE, AUC as the key metric and accuracy."""
    import mlflow

    tracking_uri = tracking_store(tmp_path)
    run_bundle(tmp_path, None, "--task", "phantom-cls", "--max_epochs", "1", "--tracking", "mlflow",
               "--tracking_uri", tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark-phantom-cls").experiment_id])
    metrics = run.data.metrics
    assert {"metric/auc", "metric/accuracy", "best/metric/auc"} <= set(metrics)
    assert 0.0 <= metrics["metric/accuracy"] <= 1.0 and run.data.tags["voco.key_metric"] == "metric/auc"

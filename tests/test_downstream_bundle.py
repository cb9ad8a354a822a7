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


def test_evaluate_and_predict_from_the_run_alone(finetuned, tmp_path, monkeypatch):
    """The run folder's settings.json rebuilds the network, preprocessing and data: evaluate with MONAI's
    --args_file from another folder, predict with `voco benchmark infer RUN`; a setting that shapes the network
    given differently, or no run at all, is one sentence before any volume is cached."""
    import nibabel as nib

    from conftest import bundle_command, run_module_in_process
    from voco.bundles import run_bundle as run_in_process
    from voco.cli import main
    from voco.errors import ConfigError

    cwd, _, _ = finetuned
    folder = cwd / "runs" / "benchmark" / "cell"
    recorded = json.loads((folder / "settings.json").read_text())
    assert (recorded["task"], recorded["size"], recorded["window_size"], recorded["run_name"]) == (
        "phantom-seg", "tiny", 2, "cell")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    evaluated = run_module_in_process(bundle_command("downstream_benchmark", ["train.json", "evaluate.json"],
                                                     "--args_file", str(folder / "settings.json")), elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "metric/dice" in (folder / "evaluation" / "metrics.csv").read_text()

    monkeypatch.chdir(elsewhere)
    assert main(["benchmark", "infer", str(folder / "checkpoints" / "model.pt")]) == 0
    predictions = sorted((folder / "predictions").glob("*_seg.nii.gz"))
    datalist = json.loads((cwd / "runs" / "phantom_tasks" / "phantom-seg" / "phantom_seg.json").read_text())
    assert len(predictions) == len(datalist["validation"]) == 2
    for prediction in predictions:  # inverted onto the grid of the original file
        name = prediction.name.replace("_seg.nii.gz", ".nii.gz")
        original = nib.load(next((cwd / "runs" / "phantom_tasks" / "phantom-seg").rglob(name)))
        assert nib.load(prediction).shape[:3] == original.shape[:3]

    with pytest.raises(RuntimeError) as caught:  # MONAI wraps what a config expression raises
        run_in_process("downstream_benchmark", ["train.json", "evaluate.json"],
                       args_file=str(folder / "settings.json"), window_size=7)
    assert isinstance(caught.value.__cause__, ConfigError)
    assert "was trained with window_size 2, but this command gives window_size 7" in str(caught.value.__cause__)
    # without the run's settings the run folder is another one
    lost = run_module_in_process(bundle_command("downstream_benchmark", ["train.json", "evaluate.json"], "--task",
                                                "phantom-seg", "--dataset_dir", str(elsewhere)), cwd)
    assert lost.returncode == 1
    last = lost.stderr.strip().splitlines()[-1]
    assert last.startswith("error: there is no trained model ") and "model.pt (" in last
    assert "holds the trained runs cell); evaluate and inference find the run from the settings" in last
    assert "--args_file runs/benchmark/<run name>/settings.json" in last and "Traceback" not in lost.stderr


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

"""Registration through the downstream benchmark bundle: the engines' iteration functions on a tiny pair, then
phantom-reg end to end with `python -m monai.bundle run` (train.json + smoke.json + registration.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_module_in_process, tracking_store

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "downstream_benchmark"


def tiny_pair(batch_size: int = 2, shape=(32, 32, 64)) -> dict[str, torch.Tensor]:
    """Moving and fixed boxes a few voxels apart, as a registration batch (image = moving + fixed channels)."""
    moving_label = torch.zeros(batch_size, 1, *shape)
    fixed_label = torch.zeros(batch_size, 1, *shape)
    moving_label[:, :, 8:20, 8:20, 16:40] = 1
    fixed_label[:, :, 10:22, 9:21, 18:42] = 1
    moving_label[:, :, 22:28, 22:28, 44:56] = 2
    fixed_label[:, :, 22:28, 22:28, 44:56] = 2
    image = torch.cat([moving_label, fixed_label], dim=1) / 2 + 0.05 * torch.randn(batch_size, 2, *shape)
    return {"image": image, "moving_label": moving_label, "fixed_label": fixed_label}


def test_train_and_eval_steps_in_monai_engines():
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.engines.utils import IterationEvents
    from monai.handlers import from_engine

    from voco.benchmark.networks import RegistrationLoss, RegistrationNetwork
    from voco.benchmark.registration import (additional_metrics, evaluation_step, key_metric,
                                             registration_train_step)
    from voco.benchmark.registry import get_task

    torch.manual_seed(0)
    task = get_task("phantom-reg")
    network = RegistrationNetwork(in_channels=2, feature_size=12, window_size=2)
    data = [tiny_pair()]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=network,
                                optimizer=torch.optim.Adam(network.parameters(), 1e-3),
                                loss_function=RegistrationLoss(num_labels=3, label_weight=1.0),
                                iteration_update=registration_train_step)
    events = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda engine, event=event: events.append(event))
    before = [p.detach().clone() for p in network.parameters()]
    trainer.run()
    loss = from_engine(["loss"], first=True)(trainer.state.output)
    assert math.isfinite(loss) and {"loss/similarity", "loss/regularization", "loss/label_dice"} <= set(
        trainer.state.output[0])
    assert events[:4] == [IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                          IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED]
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))

    two_class_task = dataclasses.replace(task, class_names=("box", "cube"))
    trained = [p.detach().clone() for p in network.parameters()]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network,
                                    iteration_update=evaluation_step(two_class_task),
                                    key_val_metric=key_metric(two_class_task),
                                    additional_metrics=additional_metrics(two_class_task))
    evaluator.run()
    metrics = evaluator.state.metrics
    assert evaluator.state.key_metric_name == "metric/dice"
    assert set(metrics) == {"metric/dice", "metric/dice/box", "metric/dice/cube", "metric/non_positive_jacobian"}
    assert 0.0 < metrics["metric/dice"] <= 1.0 and metrics["metric/dice/cube"] > 0.9  # the cube does not move
    assert 0.0 <= metrics["metric/non_positive_jacobian"] <= 1.0
    assert evaluator.state.best_metric == metrics["metric/dice"] and evaluator.state.best_metric_epoch == 1
    assert len(evaluator.state.output) == 2  # one record per pair
    assert all(torch.equal(a, b) for a, b in zip(trained, network.parameters()))  # evaluation changes nothing


def test_the_fine_tuning_configuration_refuses_registration_without_the_override():
    from voco.benchmark.finetune import require_finetune_type
    from voco.benchmark.registry import get_task
    from voco.errors import ConfigError

    with pytest.raises(ConfigError, match="registration.json"):
        require_finetune_type(get_task("ixi"))
    assert require_finetune_type(get_task("ixi"), task_types=["registration"]).id == "ixi"
    with pytest.raises(ConfigError, match="runs registration tasks"):
        require_finetune_type(get_task("btcv"), task_types=["registration"])


def test_phantom_registration_through_the_bundle(tmp_path):
    import mlflow

    files = ",".join(f"'{BUNDLE}/configs/{name}'" for name in ("train.json", "smoke.json", "registration.json"))
    tracking_uri = tracking_store(tmp_path)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"[{files}]",
               "--bundle_root", str(BUNDLE), "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
               "--task", "phantom-reg", "--max_epochs", "1", "--tracking", "mlflow",
               "--tracking_uri", tracking_uri, "--run_name", "reg"]
    result = run_module_in_process(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("benchmark-phantom-reg")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "reg" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ["metric/dice", "metric/dice/liver", "metric/non_positive_jacobian", "best/metric/dice",
                 "train_loss"]:
        assert name in metrics, name
    assert 0.0 < metrics["best/metric/dice"] <= 1.0 and 0.0 <= metrics["metric/non_positive_jacobian"] <= 1.0
    folder = tmp_path / "runs" / "benchmark" / "reg"
    assert (folder / "checkpoints" / "model.pt").is_file()
    result = json.loads((folder / "result.json").read_text())
    assert result["key_metric"] == "metric/dice" and result["best"] == pytest.approx(metrics["best/metric/dice"])


def test_phantom_registration_needs_two_training_phantoms(tmp_path):
    from voco.benchmark.phantom_tasks import prepare_phantom_task
    from voco.errors import ConfigError

    with pytest.raises(ConfigError, match="leaves no training pair"):
        prepare_phantom_task("phantom-reg", tmp_path / "pairs", n=3, n_validation=2)
    assert not (tmp_path / "pairs").exists()

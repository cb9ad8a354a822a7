"""The multi-task bundle end to end through `python -m monai.bundle run`: the smoke run (tiny windowed ViT, SimMIM +
contrastive + query box in turn) into MLflow, then its exported encoder fine-tuned by the downstream benchmark bundle
with the ViT backbone and the same attention layout."""

from __future__ import annotations

import pytest
from conftest import (assert_png_artifacts, only_finished_run, run_bundle_command, smoke_run_with_mlflow,
                      tracking_store)

TASKS = ("mae", "contrastive", "query_box")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("multitask")
    return (cwd, *smoke_run_with_mlflow("multitask_pretrain", cwd))


def test_every_task_runs_in_turn_and_logs_under_its_prefix(smoke_run):
    cwd, tracking_uri, result = smoke_run
    assert "step 6/6" in result.stdout
    client, run = only_finished_run(tracking_uri, "multitask_pretrain")
    metrics = run.data.metrics
    for name in ["loss", "lr", "task", "loss/mae/reconstruction", "metric/mae/reconstruction_psnr",
                 "loss/contrastive/positive", "metric/contrastive/retrieval_top1", "loss/query_box/giou",
                 "metric/query_box/box_iou", "val/loss", "val/metric/mae/reconstruction_psnr",
                 "val/metric/contrastive/retrieval_top1", "val/metric/query_box/box_iou"]:
        assert name in metrics, name
    # logged at steps 2, 4, 6: the task that ran at step s (1-based) is (s - 1) mod 3
    assert [point.value for point in client.get_metric_history(run.info.run_id, "task")] == [1, 0, 2]
    assert_png_artifacts(client, run, cwd, [f"views/views_{name}.png" for name in TASKS])


def test_the_cycle_position_is_checkpointed(smoke_run):
    from voco.checkpoints import read_checkpoint

    cwd, _, _ = smoke_run
    state = read_checkpoint(cwd / "runs" / "smoke" / "checkpoints" / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6 and int(state["pretext"]["step"]) == 6
    assert state["backbone_spec"]["pretext"] == "multitask" and state["backbone_spec"]["layout"] == "window"


def test_the_encoder_is_fine_tuned_by_the_downstream_bundle(smoke_run, tmp_path):
    import torch

    from voco.checkpoints import export_encoder

    cwd, _, _ = smoke_run
    checkpoint = cwd / "runs" / "smoke" / "checkpoints" / "checkpoint_final.pt"
    encoder, count = export_encoder(checkpoint, tmp_path / "vit_encoder.pt")
    assert count == 5 + 12 * 12  # patch conv (2), position table, final norm (2), 12 tensors per block
    tracking_uri = tracking_store(tmp_path)
    result = run_bundle_command("downstream_benchmark", ["train.json", "smoke.json"], tmp_path,
                                "--pretrained", str(encoder), "--backbone", "vit", "--vit_layout", "window",
                                "--vit_window_size", "2", "--max_epochs", "1", "--tracking", "mlflow",
                                "--tracking_uri", tracking_uri, "--run_name", "vit")
    output = result.stdout + result.stderr
    # the phantom task's roi (64, 64, 32) gives the pretraining's token grid: everything loads, position table too
    assert f"loaded {count}/{count} encoder tensors" in output
    _, run = only_finished_run(tracking_uri, "benchmark-phantom-seg", run_name="vit")
    assert "metric/dice" in run.data.metrics
    trained = torch.load(tmp_path / "runs" / "benchmark" / "vit" / "checkpoints" / "model.pt", weights_only=True)
    assert any(key.startswith("vit.blocks.") for key in trained)

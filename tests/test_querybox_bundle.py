"""The query-box bundle end to end through `python -m monai.bundle run`, as a user runs it: smoke settings on
phantoms it generates itself, MLflow tracking into an embedded store, checkpoints and the ViT encoder export."""

from __future__ import annotations


import pytest
from conftest import assert_png_artifacts, only_finished_run, run_bundle_command, smoke_run_with_mlflow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (4 steps of a tiny windowed ViT) tracked by default, without --tracking mlflow."""
    cwd = tmp_path_factory.mktemp("querybox")
    return (cwd, *smoke_run_with_mlflow("querybox_pretrain", cwd, monai_tracking=False))


def test_smoke_run_trains_and_logs_into_mlflow(smoke_run):
    cwd, tracking_uri, result = smoke_run
    assert "step 4/4" in result.stdout
    client, run = only_finished_run(tracking_uri, "querybox_pretrain")
    names = ["loss", "loss/l1", "loss/giou", "metric/box_iou", "metric/box_centre_error"]
    for name in names + [f"val/{name}" for name in names] + ["lr", "throughput/volumes_per_s"]:
        assert name in run.data.metrics, name
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert 0.0 <= run.data.metrics["metric/box_iou"] <= 1.0
    assert_png_artifacts(client, run, cwd, ["views/views.png"])


def test_mlflow_false_tracks_nothing(smoke_run):
    import mlflow

    cwd, tracking_uri, _ = smoke_run
    run_bundle_command("querybox_pretrain", ["train.json", "smoke.json"], cwd, "--mlflow", "False", "--run_name",
                       "untracked", "--max_steps", "2", "--probe", "False")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("querybox_pretrain").experiment_id])
    assert [run.info.run_name for run in runs] == ["smoke"]
    assert (cwd / "runs" / "untracked" / "checkpoints" / "checkpoint_final.pt").is_file()


def test_final_checkpoint_and_vit_export(smoke_run, tmp_path):
    import torch
    from monai.networks.nets import ViT

    from voco.checkpoints import export_encoder, load_encoder_weights, read_checkpoint

    cwd, _, _ = smoke_run
    checkpoint = cwd / "runs" / "smoke" / "checkpoints" / "checkpoint_final.pt"
    state = read_checkpoint(checkpoint)
    assert state["trainer"]["iteration"] == 4
    assert state["backbone_spec"]["name"] == "vit" and state["backbone_spec"]["pretext"] == "query_box"
    assert "query_token" in state["pretext"] and "box_head.bias" in state["pretext"]

    out, _ = export_encoder(checkpoint, tmp_path / "encoder.pt")
    model = ViT(in_channels=1, img_size=(32, 32, 64), patch_size=8, hidden_size=96, mlp_dim=384, num_layers=12,
                num_heads=3, qkv_bias=True)
    report = load_encoder_weights(model, out)
    # MONAI's blocks also hold a `norm_cross_attn` that is used only with_cross_attention=True: not an encoder part
    encoder = [key for key in model.state_dict()
               if key.startswith(("patch_embedding.patch_embeddings", "blocks.", "norm.")) and "cross_attn" not in key]
    assert len(encoder) == 2 + 12 * 12 + 2  # conv weight and bias; per block 2 norms, qkv, out_proj, mlp; final norm
    assert sorted(set(encoder) - set(report.loaded)) == []
    trained = state["pretext"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], trained[f"backbone.{key}"]) for key in encoder)

"""The MAE bundle end to end through `python -m monai.bundle run`, as a user runs it: smoke settings on phantoms
it generates itself, MLflow tracking into an embedded store, checkpoints, resume, export into MONAI's ViT, and
SimMIM on the Swin encoder under torchrun."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import (assert_png_artifacts, only_finished_run, run_bundle_command, smoke_run_with_mlflow,
                      torchrun_smoke_run)


def run_bundle(cwd: Path, *overrides: str, **options) -> subprocess.CompletedProcess:
    return run_bundle_command("mae_pretrain", ["train.json", "smoke.json"], cwd, *overrides, **options)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (4 steps) with MLflow tracking, then the same command extended to 6 steps."""
    cwd = tmp_path_factory.mktemp("mae_bundle")
    tracking_uri, first = smoke_run_with_mlflow("mae_pretrain", cwd)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name("mae_pretrain").experiment_id])[0].info.run_id
    first_loss = [point.step for point in client.get_metric_history(run_id, "loss")]
    _, resumed = smoke_run_with_mlflow("mae_pretrain", cwd, "--max_steps", "6")
    return cwd, tracking_uri, (first, first_loss), resumed


def test_smoke_run_trains_and_logs_into_mlflow(smoke_run):
    cwd, tracking_uri, (first, first_loss), _ = smoke_run
    assert "step 4/4" in first.stdout and first_loss == [2, 4]
    client, run = only_finished_run(tracking_uri, "mae_pretrain")
    for name in ["loss", "loss/reconstruction", "metric/reconstruction_psnr", "metric/mask_ratio", "lr",
                 "throughput/volumes_per_s", "data/skipped_volumes", "val/loss/reconstruction",
                 "val/metric/reconstruction_psnr"]:
        assert name in run.data.metrics, name
    assert run.data.metrics["metric/mask_ratio"] == 0.75
    assert 0.0 < run.data.metrics["metric/reconstruction_psnr"] < 100.0
    assert_png_artifacts(client, run, cwd, ["views/views.png"])
    assert (cwd / "runs" / "artifacts").is_dir() and not (cwd / "mlruns").exists()


def test_extending_a_finished_run_continues_its_mlflow_run_on_a_rebuilt_schedule(smoke_run):
    """The finished 4-step run, run again with --max_steps 6: the same MLflow run goes on (not a second run of the
    name) and the learning rate follows the 6-step cosine from step 4 on, not the 4-step one climbing back up."""
    import torch
    from monai.optimizers import WarmupCosineSchedule

    cwd, tracking_uri, _, resumed = smoke_run
    client, run = only_finished_run(tracking_uri, "mae_pretrain")  # one run of the name, FINISHED again
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert "learning-rate schedule rebuilt" in resumed.stdout + resumed.stderr
    logged = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "lr")}

    def schedule(max_steps: int, steps: int) -> list[float]:
        """The learning rate each step trains with, as smoke.json sets it (warm-up 1 step) -> [step 1, ...]."""
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.001)
        scheduler = WarmupCosineSchedule(optimizer, warmup_steps=1, t_total=max_steps)
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    assert logged[4] == pytest.approx(schedule(4, 4)[3], rel=1e-6)
    assert logged[6] == pytest.approx(schedule(6, 6)[5], rel=1e-6)
    assert logged[6] != pytest.approx(schedule(4, 6)[5], rel=1e-3)  # the old schedule, past its end


def test_checkpoints_resume_and_export_into_monai_vit(smoke_run, tmp_path):
    import torch
    from monai.networks.nets import ViT

    from voco.checkpoints import export_encoder, read_checkpoint

    cwd, _, _, resumed = smoke_run
    checkpoints = cwd / "runs" / "smoke" / "checkpoints"
    assert "checkpoint_final.pt" in {path.name for path in checkpoints.glob("*.pt")}
    assert "step 6/6" in resumed.stdout and "step 2/6" not in resumed.stdout  # went on from step 4
    state = read_checkpoint(checkpoints / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6
    assert state["backbone_spec"]["name"] == "vit" and state["backbone_spec"]["pretext"] == "mae"
    assert any(key.startswith("decoder_blocks.") for key in state["pretext"])
    out, count = export_encoder(checkpoints / "checkpoint_final.pt", tmp_path / "encoder.pt")
    exported = torch.load(out, weights_only=True)
    assert not any("decoder" in key or "mask_token" in key for key in exported)
    assert all(torch.equal(exported[key], state["pretext"][f"backbone.{key}"]) for key in exported)
    # as smoke.json: ViT tiny (96 wide, 12 blocks, 3 heads), patch 8 on 32^3 regions
    vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=96, mlp_dim=384, num_layers=12, num_heads=3,
              qkv_bias=True)
    result = vit.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == [] and all("norm_cross_attn" in key for key in result.missing_keys)
    assert len(exported) == count


def test_simmim_on_the_swin_encoder_with_torchrun_on_cpu(tmp_path):
    """`torchrun --nproc_per_node 2` with the multi-GPU overrides (gloo), SimMIM with block masks on the tiny Swin:
    the Swin's shallower encoder blocks get no gradient, which DDP is told about."""
    import mlflow

    tracking_uri, result = torchrun_smoke_run(
        "mae_pretrain", tmp_path, "swin-simmim",
        "--variant", "simmim", "--mask_type", "block", "--mask_ratio", "0.5", "--region_size", "[32,32,64]",
        "--backbone", "{'name': 'swin', 'size': 'tiny', 'in_channels': 1, 'window_size': 2}")
    assert result.stdout.count("step 4/4") == 1  # progress from rank 0 only
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("mae_pretrain").experiment_id])
    assert [run.info.run_name for run in runs] == ["swin-simmim"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["metric/mask_ratio"] == 0.5
    state_names = {path.name for path in (tmp_path / "runs" / "swin-simmim" / "checkpoints").glob("*.pt")}
    assert "checkpoint_final.pt" in state_names


def test_the_compile_switch_trains_the_same_parameters(tmp_path):
    """`--compile True` (here with the aot_eager backend: dynamo traces each ViT block, no code generation on a
    CPU): the run finishes and its checkpoint has the parameter names of an uncompiled run."""
    from voco.checkpoints import read_checkpoint

    result = run_bundle(tmp_path, "--compile", "True", "--compile_backend", "aot_eager", "--run_name", "compiled")
    assert "step 4/4" in result.stdout
    state = read_checkpoint(tmp_path / "runs" / "compiled" / "checkpoints" / "checkpoint_final.pt")
    assert not any("_orig_mod" in key for key in state["pretext"])
    assert "backbone.blocks.0.attn.qkv.weight" in state["pretext"]

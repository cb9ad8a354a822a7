"""The CLIP bundle end to end through `python -m monai.bundle run`, as a user runs it: phantom studies with reports
and findings it generates itself, MLflow tracking with zero-shot and retrieval metrics on the validation studies,
checkpoints the model can be rebuilt from, resume, export of the ViT encoder, and two ranks under torchrun."""

from __future__ import annotations

import pytest
from conftest import assert_png_artifacts, only_finished_run, smoke_run_and_resume, torchrun_smoke_run

FINDINGS = ("kidney_lesion", "liver_lesion", "splenomegaly")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (4 steps) with MLflow tracking, then the same command resumed to 6 steps."""
    cwd = tmp_path_factory.mktemp("clip_bundle")
    tracking_uri, first, resumed = smoke_run_and_resume("clip_pretrain", cwd)
    return cwd, tracking_uri, first, resumed


def test_smoke_run_logs_the_contrastive_loss_and_zero_shot_metrics(smoke_run):
    cwd, tracking_uri, first, _ = smoke_run
    assert "step 4/4" in first.stdout
    client, run = only_finished_run(tracking_uri, "clip_pretrain")
    expected = ["loss", "loss/contrastive", "metric/logit_scale", "metric/batch_top1", "lr", "data/skipped_volumes",
                "val/loss/contrastive", "val/metric/zero_shot/mean_auc", "val/metric/zero_shot/mean_balanced_accuracy",
                "val/metric/retrieval/study_to_report_recall_at_1", "val/metric/retrieval/report_to_study_recall_at_1"]
    expected += [f"val/metric/zero_shot/{name}/auc" for name in FINDINGS]
    assert all(name in run.data.metrics for name in expected), sorted(set(expected) - set(run.data.metrics))
    assert 0.0 < run.data.metrics["metric/logit_scale"] <= 100.0
    recall = run.data.metrics["val/metric/retrieval/study_to_report_recall_at_1"]
    assert 0.0 <= recall <= 1.0
    assert_png_artifacts(client, run, cwd, ["views/views.png"])


def test_the_checkpoint_rebuilds_the_model_resumes_and_exports_the_vit(smoke_run, tmp_path):
    import torch

    from voco.checkpoints import export_encoder, read_checkpoint
    from voco.pretext.clip import CLIPPretext, clip_from_checkpoint

    cwd, _, _, resumed = smoke_run
    checkpoints = cwd / "runs" / "smoke" / "checkpoints"
    assert "step 6/6" in resumed.stdout and "step 2/6" not in resumed.stdout  # went on from step 4
    state = read_checkpoint(checkpoints / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6
    spec = state["backbone_spec"]
    assert spec["pretext"] == "clip" and spec["layout"] == "slice" and spec["clip"]["text_encoder"]["name"] == "small"
    model = clip_from_checkpoint(state)
    assert isinstance(model, CLIPPretext) and not model.training
    assert all(torch.equal(value, state["pretext"][key]) for key, value in model.state_dict().items()
               if isinstance(value, torch.Tensor))
    embedding = model.encode_reports(["Liver: normal, no focal lesion."])
    assert embedding.shape == (1, spec["clip"]["embedding_dim"])
    out, count = export_encoder(checkpoints / "checkpoint_final.pt", tmp_path / "encoder.pt")
    exported = torch.load(out, weights_only=True)
    assert count == len(exported) and not any(key.startswith(("text_encoder", "cls_token", "study_projection"))
                                              for key in exported)
    assert all(torch.equal(exported[key], state["pretext"][f"backbone.{key}"]) for key in exported)


def test_two_ranks_with_torchrun_gather_negatives_into_one_run(tmp_path):
    """`torchrun --nproc_per_node 2` with the multi-GPU overrides on CPU (gloo): gathered negatives, one MLflow run."""
    tracking_uri, result = torchrun_smoke_run("clip_pretrain", tmp_path, "two-ranks", "--batch_size", "2")
    assert result.stdout.count("step 4/4") == 1  # rank 0 prints
    client, run = only_finished_run(tracking_uri, "clip_pretrain", "two-ranks")
    assert "val/metric/zero_shot/mean_auc" in run.data.metrics
    assert (tmp_path / "runs" / "two-ranks" / "checkpoints" / "checkpoint_final.pt").is_file()


def test_one_held_out_study_skips_validation_and_too_few_studies_name_the_counts(tmp_path, monkeypatch, capsys):
    """CLIP needs two studies per step: one held-out study (12 studies, validation_fraction 0.05) is skipped with the
    sentence the other bundles print, not an error whose advice is already followed; three studies for a batch of
    four hold none out and stop naming the counts and the setting."""
    from voco.bundles import run_bundle

    monkeypatch.chdir(tmp_path)
    run_bundle("clip_pretrain", ["train.json", "smoke.json"], validation_fraction=0.05, max_steps=2, val_interval=2,
               run_name="one-held-out")
    out = capsys.readouterr().out
    assert "validation at step 2: no complete batch of held-out volumes; add volumes or raise validation_fraction" in out
    assert (tmp_path / "runs" / "one-held-out" / "checkpoints" / "checkpoint_final.pt").is_file()
    with pytest.raises(Exception) as caught:
        run_bundle("clip_pretrain", ["train.json", "smoke.json"], run_name="three", manifest=(
            "$voco.data.phantoms.ensure_phantom_studies(os.path.abspath('runs/three_studies'), n=3, seed=0)"))
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("the training split holds 3 volumes (studies for the language-image bundles), fewer than batch_size "
               "4; lower --batch_size to at most 3" in text for text in chain), chain

"""The MG-3D bundle end to end through `python -m monai.bundle run`, as a user runs it: phantom studies with reports
it generates itself, every loss part and the zero-shot metrics in MLflow, the picture of a masked volume with its
reconstruction and the report's masked and predicted words, resume from its checkpoint, two ranks under torchrun;
and the table-making of benchmarks/mg3d_ablation.py on given numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import assert_png_artifacts, only_finished_run, smoke_run_and_resume, torchrun_smoke_run

PARTS = ("mlm", "sfr", "mim", "cml", "dfa", "ssm")
FINDINGS = ("kidney_lesion", "liver_lesion", "splenomegaly")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (4 steps) with MLflow tracking, then the same command resumed to 6 steps."""
    cwd = tmp_path_factory.mktemp("mg3d_bundle")
    tracking_uri, first, resumed = smoke_run_and_resume("mg3d_pretrain", cwd, "--probe", "False")
    return cwd, tracking_uri, first, resumed


def test_smoke_run_logs_every_loss_part_the_zero_shot_metrics_and_the_picture(smoke_run):
    cwd, tracking_uri, first, _ = smoke_run
    assert "step 4/4" in first.stdout
    client, run = only_finished_run(tracking_uri, "mg3d_pretrain")
    expected = ["loss", "lr", "probe/dice", "val/loss", "val/metric/zero_shot/mean_auc",
                "val/metric/retrieval/study_to_report_recall_at_1", "val/metric/retrieval/report_to_study_recall_at_5"]
    expected += [f"{prefix}loss/{part}" for part in PARTS for prefix in ("", "val/")]
    expected += [f"val/metric/zero_shot/{name}/auc" for name in FINDINGS]
    assert all(name in run.data.metrics for name in expected), sorted(set(expected) - set(run.data.metrics))
    assert all(math.isfinite(run.data.metrics[f"loss/{part}"]) for part in PARTS)
    assert 0.0 <= run.data.metrics["val/metric/retrieval/study_to_report_recall_at_1"] <= 1.0
    assert_png_artifacts(client, run, cwd, ["views/views.png"])


def test_the_phantom_reports_give_ssm_similar_and_dissimilar_sentences(smoke_run):
    """The smoke run's 12 phantom reports: four sentences each (liver, spleen, kidneys, impression), findings that
    differ between patients, and sentences that recur word for word in other patients' reports."""
    from voco.data.reports import split_sentences
    from voco.data.regions import resolve_datalist
    from voco.data.studies import group_studies, report_texts

    cwd = smoke_run[0]
    manifest = cwd / "runs" / "phantom_studies" / "manifest.json"
    sentences = [split_sentences(report) for report in report_texts(str(manifest))]
    assert len(sentences) == 12 and all(len(report) >= 4 for report in sentences)
    findings = {tuple(study["findings"].values()) for study in group_studies(resolve_datalist(str(manifest)))}
    assert len(findings) >= 3  # several combinations of liver lesion / kidney lesion / splenomegaly
    spleen = [report[1] for report in sentences]  # a few wordings, so patients share sentences word for word
    assert len(set(spleen)) < len(spleen)


def test_the_same_command_resumes_from_the_checkpoint(smoke_run):
    from voco.checkpoints import read_checkpoint

    cwd, _, _, resumed = smoke_run
    assert "step 6/6" in resumed.stdout and "step 2/6" not in resumed.stdout  # went on from step 4
    state = read_checkpoint(cwd / "runs" / "smoke" / "checkpoints" / "checkpoint_final.pt")
    assert state["trainer"]["iteration"] == 6
    spec = state["backbone_spec"]
    assert spec["pretext"] == "mg3d" and spec["layout"] == "slice"
    assert spec["mg3d"]["loss_weights"] == {"mlm_weight": 1.0, "sfr_weight": 0.1, "mim_weight": 1.0,
                                            "cml_weight": 0.1, "dfa_weight": 0.1, "ssm_weight": 0.1}
    assert any(key.startswith("backbone.") for key in state["pretext"])


def test_two_ranks_with_torchrun_finish_as_one_mlflow_run(tmp_path):
    """`torchrun --nproc_per_node 2` with the multi-GPU overrides on CPU (gloo): CML and DFA gather their negatives,
    rank 0 logs, one MLflow run."""
    tracking_uri, result = torchrun_smoke_run("mg3d_pretrain", tmp_path, "two-ranks", "--batch_size", "2",
                                              "--max_steps", "2", "--probe", "False")
    assert result.stdout.count("step 2/2") == 1  # rank 0 prints
    _, run = only_finished_run(tracking_uri, "mg3d_pretrain", "two-ranks")
    assert "loss/dfa" in run.data.metrics and "val/metric/zero_shot/mean_auc" in run.data.metrics
    assert (tmp_path / "runs" / "two-ranks" / "checkpoints" / "checkpoint_final.pt").is_file()


def test_study_and_report_embeddings_are_cmls_and_need_its_heads():
    """`encode_studies` / `encode_reports` (what the zero-shot evaluation reads) are the embeddings CML contrasts:
    InfoNCE of the two at CML's scale is the pretext's ``loss/cml``; without CML's volume-report heads, one sentence."""
    import torch
    from test_mg3d import small_pretext, study_batch

    from voco.errors import ConfigError
    from voco.pretext.clip import clip_loss

    pretext, batch = small_pretext().eval(), study_batch()
    with torch.no_grad():
        studies, reports = pretext.encode_studies(batch["image"], batch["scan_mask"]), pretext.encode_reports(
            batch["report"])
        assert studies.shape == reports.shape == (4, 16)
        torch.testing.assert_close(studies.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(clip_loss(studies, reports, pretext.current_logit_scale()),
                                   pretext(batch)["loss/cml"])
    for kwargs in ({"cml_weight": 0}, {"cml_pairing": "reference"}):
        with pytest.raises(ConfigError, match="CML heads; set cml_weight above 0"):
            small_pretext(**kwargs).encode_reports(["Liver lesion."])


# --------------------------------------------------------------------------------------------------
# The ablation's table
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def ablation(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("mg3d_ablation")


def test_ablation_table_gives_mean_sd_paired_differences_and_a_sentence_per_part(ablation):
    """Two configs, three seeds, every metric of CLIP at 0.5 + seed / 100: MIM adds 0.04 / 0.05 / 0.06 to the probe
    Dice (t = 8.7: measurable) and 0.1 / -0.1 / 0.0 to the mean AUC (not measurable); SSM adds nothing anywhere."""
    metrics = [key for key, _ in ablation.METRICS]
    clip = {seed: {key: 0.5 + seed / 100 for key in metrics} for seed in (0, 1, 2)}
    mim = {seed: dict(values) for seed, values in clip.items()}
    for seed, (dice, auc) in enumerate([(0.04, 0.1), (0.05, -0.1), (0.06, 0.0)]):
        mim[seed]["probe/dice"] += dice
        mim[seed]["val/metric/zero_shot/mean_auc"] += auc
    runs = [{"config": config, "seed": seed, "metrics": values[seed], "seconds": 60.0,
             "machine": {"load_before": 0.0, "load_after": 0.0, "other_share": 0.0}}
            for config, values in (("clip", clip), ("clip+mim", mim), ("clip+ssm", clip)) for seed in (0, 1, 2)]
    report = {"date": "2026-01-01", "cpu_count": 2, "command": "python benchmarks/mg3d_ablation.py", "studies": 600,
              "steps": 400, "seeds": [0, 1, 2], "minutes": 9.0, "minutes_per_run": 1.0, "random_init": [0.3, 0.3, 0.3],
              "runs": runs}

    differences = ablation.differences_against_baseline(
        {"clip": clip, "clip+mim": mim, "clip+ssm": clip})
    assert differences["clip+mim"]["probe/dice"] == pytest.approx([0.04, 0.05, 0.06])
    assert ablation.paired_t(differences["clip+mim"]["probe/dice"]) == pytest.approx(0.05 / (0.01 / math.sqrt(3)))
    assert ablation.measurable([0.04, 0.05, 0.06]) and not ablation.measurable([0.1, -0.1, 0.0])
    assert not ablation.measurable([0.3]) and ablation.measurable([0.02, 0.02, 0.02])
    # Recall moves in steps of 1/n: the same step every seed, up to float rounding, is "every seed the same"
    same = [clip - (clip + 8 / 120) for clip in (0.05, 0.1, 0.7)]
    assert math.isinf(ablation.paired_t(same)) and ablation.t_text(ablation.paired_t(same)) == "every seed the same"

    table = ablation.markdown(report)
    assert "| clip | 51.0 ± 1.0 |" in table  # mean ± sd over the seeds, x100
    assert "| random init | - |" in table and "30.0 ± 0.0 |" in table
    mim_row = next(line for line in table.splitlines() if line.startswith("| clip+mim |") and "/" in line)
    assert mim_row.split(" | ")[1] == "+10.0 / -10.0 / +0.0" and mim_row.endswith("+4.0 / +5.0 / +6.0 |")
    assert "**clip+mim**: a measurable effect on probe Dice +5.0 (t = 8.7), no measurable effect on the rest." in table
    assert "**clip+ssm**: no measurable effect on any metric" in table
    assert "Timing note" not in table

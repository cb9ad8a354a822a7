"""The vision-language rows of the downstream benchmark on a tiny fake CT-RATE copy: phantom studies written in the
CT-RATE layout with its two CSV tables, and a tiny CLIP checkpoint. The manifest builder, the copy check, the
metrics against `voco.pretext.zero_shot` on the same embeddings, vocabulary fine-tuning through `voco benchmark
run` (one in-process command for all three cells) into a real MLflow store, the report, and the user's errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tracking_store

from voco.benchmark.registry import get_task
from voco.cli import main
from voco.errors import CheckpointError, ConfigError, ManifestError

CLASSES = get_task("ct-rate-vocab-cls").class_names
# Three abnormalities carry the phantom's findings (so they show in the images); the other 15 are 0, as in CT-RATE.
LABELLED = {"Lung nodule": "liver_lesion", "Pleural effusion": "kidney_lesion", "Cardiomegaly": "splenomegaly"}
# Phantom studies 0-3 are training studies, 4-9 validation; 4 and 5 are two studies of one patient.
PLACES = ([("train", f"train_{i + 1}", f"train_{i + 1}_a") for i in range(4)]
          + [("valid", "valid_1", "valid_1_a"), ("valid", "valid_1", "valid_1_b")]
          + [("valid", f"valid_{i}", f"valid_{i}_a") for i in range(2, 6)])
SCAN_SIZE, TEXT = [32, 32, 16], {"name": "small", "width": 32, "depth": 1, "num_heads": 2, "max_length": 64}
SPEC = {"name": "vit", "size": "tiny", "in_channels": 1, "use_checkpoint": False, "input_size": SCAN_SIZE,
        "patch_size": [8, 8, 4], "layout": "slice", "max_scans": 4}


def impression(findings: dict) -> str:
    return "Splenomegaly." if findings["splenomegaly"] else "No splenomegaly."


def write_table(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def ct_rate(tmp_path_factory) -> dict:
    """A CT-RATE copy: <root>/dataset/{train,valid}/<patient>/<study>/<volume>.nii.gz, the reports and the labels
    tables (one row per volume, a study's volumes sharing its report and labels)."""
    from voco.data.manifest import load_manifest
    from voco.data.phantoms import ensure_phantom_studies

    base = tmp_path_factory.mktemp("ct_rate")
    phantoms = load_manifest(ensure_phantom_studies(base / "phantoms", n=len(PLACES), seed=0,
                                                    shape_range=((24, 32), (24, 32), (12, 16))))
    dataset = base / "CT-RATE" / "dataset"
    reports = {"train": [], "valid": []}
    labels = {"train": [], "valid": []}
    studies = {}
    for (split, patient, study_id), subject in zip(PLACES, phantoms["datasets"][0]["subjects"]):
        study = subject["studies"][0]
        volumes = []
        for number, scan in enumerate(study["scans"], start=1):
            volume = f"{study_id}_{number}.nii.gz"
            target = dataset / split / patient / study_id / volume
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(base / "phantoms" / scan["image"], target)
            volumes.append(target)
            reports[split].append([volume, "Not given.", "Non-contrast CT.", study["report"],
                                   impression(study["findings"])])
            labels[split].append([volume] + [int(study["findings"].get(LABELLED.get(name, ""), False))
                                             for name in CLASSES])
        studies[study_id] = {"split": split, "patient": patient, "volumes": volumes, "report": study["report"],
                             "findings": study["findings"]}
    for split, table in (("train", "train"), ("valid", "validation")):
        write_table(dataset / "radiology_text_reports" / f"{table}_reports.csv",
                    ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
                    reports[split])
        write_table(dataset / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
                    ["VolumeName", *CLASSES], labels[split])
    validation = [study for study in studies.values() if study["split"] == "valid"]
    for finding in LABELLED.values():  # AUC needs both classes among the validation studies
        assert {study["findings"][finding] for study in validation} == {True, False}
    return {"root": base / "CT-RATE", "dataset": dataset, "studies": studies}


@pytest.fixture(scope="module")
def clip_checkpoint(ct_rate, tmp_path_factory) -> Path:
    """What bundles/clip_pretrain writes, for a tiny hierarchical ViT and a small text encoder."""
    from voco.networks import build_backbone
    from voco.networks.text import build_text_encoder
    from voco.pretext.clip import CLIPPretext

    torch.manual_seed(0)
    texts = [f"{study['report']}\n\n{impression(study['findings'])}" for study in ct_rate["studies"].values()]
    pretext = CLIPPretext(build_backbone(**SPEC), build_text_encoder(**TEXT, reports=texts), embedding_dim=64)
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    torch.save({"pretext": pretext.state_dict(),
                "backbone_spec": {**SPEC, "pretext": "clip",
                                  "clip": {"embedding_dim": 64, "loss": "infonce", "text_encoder": TEXT}}}, path)
    return path


def validation_loader(dataset: Path, findings=None):
    """The validation studies as the bundle loads them (same scan size, scan count, preset, order)."""
    from voco.benchmark.ct_rate import build_ct_rate_manifest, split_scans
    from voco.data.studies import build_study_loader

    manifest = build_ct_rate_manifest(dataset, splits=("validation",), finding_names=findings or ())
    return build_study_loader(split_scans(manifest, "validation"), batch_size=2, num_workers=0, shuffle=False,
                              drop_last=False, scan_mode="pad", scan_size=SCAN_SIZE, max_scans=4, cache="none",
                              findings=list(findings) if findings else None, sentence_shuffle=False)


def one_sentence(error: BaseException, *words: str) -> None:
    message = str(error)
    assert "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, (word, message)


# --------------------------------------------------------------------------------------------------------------
# The copy


def test_manifest_of_the_copy_has_splits_studies_reports_and_findings(ct_rate, tmp_path):
    from voco.benchmark.ct_rate import build_ct_rate_manifest, split_scans
    from voco.data.manifest import load_manifest
    from voco.data.studies import group_studies

    output = tmp_path / "ct_rate.json"
    manifest = build_ct_rate_manifest(ct_rate["root"], splits=("training", "validation"), finding_names=CLASSES,
                                      output=output)
    assert load_manifest(output)["datasets"] == manifest["datasets"]  # written, and valid
    (dataset,) = manifest["datasets"]
    assert (dataset["name"], dataset["preset"]) == ("CT-RATE", "ct_rate")
    for split, name in (("training", "train"), ("validation", "valid")):
        studies = {study["study"]: study for study in group_studies(split_scans(manifest, split))}
        expected = {key: value for key, value in ct_rate["studies"].items() if value["split"] == name}
        assert set(studies) == set(expected)
        for study_id, study in studies.items():
            truth = expected[study_id]
            assert study["subject"] == truth["patient"]  # valid_1 holds two studies
            assert sorted(scan["image"] for scan in study["scans"]) == sorted(map(str, truth["volumes"]))
            assert study["report"] == f"{truth['report']}\n\n{impression(truth['findings'])}"
            assert set(study["findings"]) == set(CLASSES)
            for name in CLASSES:
                assert study["findings"][name] == bool(truth["findings"].get(LABELLED.get(name, ""), False))
    assert {len(study["scans"]) for study in group_studies(split_scans(manifest, "validation"))} != {1}

    per_volume = build_ct_rate_manifest(ct_rate["dataset"], unit="volume")  # the dataset/ folder works too
    volumes = split_scans(per_volume, "validation")
    assert len(group_studies(volumes)) == len(volumes) == sum(
        len(study["volumes"]) for study in ct_rate["studies"].values() if study["split"] == "valid")
    assert all("findings" not in entry for entry in volumes)  # no labels asked for

    few = split_scans(manifest, "training", training_cases=2, seed=1)
    assert len(group_studies(few)) == 2 and few == split_scans(manifest, "training", training_cases=2, seed=1)


def test_manifest_ct_rate_and_synth_studies_commands(ct_rate, tmp_path, capsys):
    from voco.data.manifest import load_manifest, to_datalist
    from voco.data.studies import group_studies

    output = tmp_path / "valid.json"
    assert main(["manifest", "ct_rate", str(ct_rate["root"]), "--output", str(output), "--splits", "validation"]) == 0
    assert "6 studies, " in capsys.readouterr().out
    studies = group_studies(to_datalist(load_manifest(output)))
    assert len(studies) == 6 and all(len(study["findings"]) == len(CLASSES) for study in studies)

    assert main(["synth", str(tmp_path / "studies"), "--studies", "2", "--seed", "1"]) == 0
    assert "wrote 2 phantom studies" in capsys.readouterr().out
    studies = group_studies(to_datalist(load_manifest(tmp_path / "studies" / "manifest.json")))
    assert len(studies) == 2 and all(study["report"] and study["findings"] for study in studies)


def test_the_copy_check_names_each_problem_in_one_sentence(ct_rate, tmp_path):
    from voco.benchmark.checks import check_task_dataset
    from voco.benchmark.ct_rate import build_ct_rate_manifest

    task = get_task("ct-rate-vocab-cls")
    good = check_task_dataset(task, ct_rate["root"])
    assert list(good) == [] and good.scans == sum(len(study["volumes"]) for study in ct_rate["studies"].values())

    broken = tmp_path / "broken"
    shutil.copytree(ct_rate["dataset"], broken / "dataset")
    (broken / "dataset" / "radiology_text_reports" / "validation_reports.csv").unlink()
    labels = broken / "dataset" / "multi_abnormality_labels" / "train_predicted_labels.csv"
    table = list(csv.reader(labels.open()))
    write_table(labels, [name.replace("Cardiomegaly", "Cardiac") for name in table[0]], table[2:])  # row 1 gone
    next((broken / "dataset" / "valid").rglob("*.nii.gz")).write_bytes(b"not a volume")
    rows = check_task_dataset(task, broken, read_voxels=False)
    problems = [row["problem"] for row in rows]
    assert len(problems) == 4, problems
    for problem in problems:
        assert "\n" not in problem and problem.endswith(".")
    assert any("validation_reports.csv does not exist" in problem for problem in problems)
    assert any("no column 'Cardiomegaly'" in problem for problem in problems)
    assert any("1 of" in problem and "have no row in train_predicted_labels.csv" in problem for problem in problems)
    assert sum("valid" in row["entry"] and row["path"].endswith(".nii.gz") for row in rows) == 1
    assert list(check_task_dataset(get_task("ct-rate-retrieval"), ct_rate["root"], read_voxels=False)) == []

    with pytest.raises(ManifestError) as error:
        build_ct_rate_manifest(broken, finding_names=CLASSES)
    one_sentence(error.value, "validation reports table", "validation_reports.csv")
    with pytest.raises(ManifestError) as error:
        build_ct_rate_manifest(broken, splits=("training",), finding_names=CLASSES)
    one_sentence(error.value, "no column 'Cardiomegaly'")
    with pytest.raises(ManifestError) as error:
        build_ct_rate_manifest(tmp_path / "nowhere")
    one_sentence(error.value, "nowhere", "does not exist")


def test_checkpoints_that_are_no_clip_model_are_refused(clip_checkpoint, tmp_path):
    from voco.benchmark.runs import plan_grid
    from voco.benchmark.vision_language import read_clip_checkpoint
    from voco.networks import build_backbone

    encoder = tmp_path / "voco_encoder.pt"
    torch.save(build_backbone("swin", "tiny").state_dict(), encoder)
    for source, kind, words in ((encoder, ConfigError, ("voco_encoder.pt", "no CLIP model")),
                                ("scratch", ConfigError, ("not scratch",)),
                                (tmp_path / "missing.pt", CheckpointError, ("missing.pt", "does not exist"))):
        with pytest.raises(kind) as error:
            read_clip_checkpoint(source)
        one_sentence(error.value, *words)
    with pytest.raises(ConfigError, match="not scratch"):
        plan_grid(["ct-rate-retrieval"], ["scratch"])

    cells = plan_grid(["ct-rate-retrieval", "ct-rate-vocab-cls", "btcv"], [str(clip_checkpoint), "scratch"],
                      seeds=(0, 1), modes=("finetune",))
    vision_language = [(cell.task, cell.mode, cell.seed, cell.backbone, cell.size) for cell in cells
                       if cell.task != "btcv"]
    assert vision_language == [("ct-rate-retrieval", "zero_shot", 0, "vit", "tiny"),  # its one mode, one seed
                               ("ct-rate-vocab-cls", "finetune", 0, "vit", "tiny"),
                               ("ct-rate-vocab-cls", "finetune", 1, "vit", "tiny")]
    assert {cell.mode for cell in cells if cell.task == "btcv"} == {"finetune", "scratch"}
    assert [cell.mode for cell in plan_grid(["ct-rate-vocab-cls"], [str(clip_checkpoint)])] == ["zero_shot",
                                                                                                 "finetune"]
    with pytest.raises(ConfigError, match="are for vision-language tasks"):
        plan_grid(["btcv"], ["a.pt"], modes=["zero_shot"])


# --------------------------------------------------------------------------------------------------------------
# Metrics and the VocabFine objective


def test_pair_logits_give_the_zero_shot_probabilities_and_vocab_finetuning_learns(clip_checkpoint, ct_rate):
    from voco.benchmark.vision_language import VOCABULARY_TEMPLATES, VocabularyFineTuning, prompt_pair_logits
    from voco.checkpoints import read_checkpoint
    from voco.pretext.clip import clip_from_checkpoint
    from voco.pretext.zero_shot import finding_phrase, zero_shot_probabilities

    clip = clip_from_checkpoint(read_checkpoint(clip_checkpoint))
    batch = next(iter(validation_loader(ct_rate["dataset"], CLASSES)))
    with torch.no_grad():
        studies = clip.encode_studies(batch["image"], batch["scan_mask"])
        phrases = [finding_phrase(name) for name in CLASSES]
        logits = prompt_pair_logits(clip, studies, phrases, VOCABULARY_TEMPLATES)
        expected = zero_shot_probabilities(clip, studies, phrases, VOCABULARY_TEMPLATES)
    assert logits.shape == (2, len(CLASSES), 2)
    assert torch.allclose(logits.softmax(dim=-1)[..., 1], expected, atol=1e-6)

    model = VocabularyFineTuning(clip, CLASSES)
    assert not any(parameter.requires_grad for parameter in clip.text_encoder.parameters())
    batch["findings"][0, 0] = float("nan")  # an unknown label is left out of the loss
    output = model(batch)
    output["loss"].backward()
    assert torch.isfinite(output["loss"]) and clip.study_projection.weight.grad is not None
    assert clip.report_projection.weight.grad is not None
    with pytest.raises(ConfigError, match="finding names"):
        VocabularyFineTuning(clip, ())


# --------------------------------------------------------------------------------------------------------------
# The command a user types: all three cells in one grid, then the report


def test_benchmark_run_scores_retrieval_zero_shot_and_vocab_finetuning(ct_rate, clip_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    import mlflow

    from voco.benchmark.vision_language import read_clip_checkpoint
    from voco.pretext.clip import clip_from_checkpoint
    from voco.pretext.zero_shot import evaluate_zero_shot, recall_at_k

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_store(tmp_path)
    command = ["benchmark", "run", "ct-rate-retrieval,ct-rate-vocab-cls", "--pretrained", str(clip_checkpoint),
               "--dataset_dir", str(ct_rate["root"]), "--max_epochs", "3", "--learning_rate", "0.001",
               "--tracking_uri", uri]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "benchmark grid: 3 runs" in out and "grid: 3 done, 0 skipped" in out

    client = mlflow.MlflowClient(tracking_uri=uri)

    def run_of(task: str, mode: str):
        experiment = client.get_experiment_by_name(f"benchmark-{task}")
        (run,) = [run for run in client.search_runs([experiment.experiment_id]) if run.data.tags["voco.mode"] == mode]
        assert run.info.status == "FINISHED" and run.data.tags["voco.backbone"] == "vit"
        return run

    # Retrieval: the logged Recall@K is recall_at_k of the same studies' embeddings (6 studies: K = 5 only).
    clip = clip_from_checkpoint(read_clip_checkpoint(clip_checkpoint))
    loader = validation_loader(ct_rate["dataset"])
    with torch.no_grad():
        studies = torch.cat([clip.encode_studies(batch["image"], batch["scan_mask"]) for batch in loader])
        reports = torch.cat([clip.encode_reports(batch["report"]) for batch in loader])
    assert len(studies) == 6
    retrieval = run_of("ct-rate-retrieval", "zero_shot").data.metrics
    assert retrieval["best/metric/retrieval/report_to_study_recall_at_5"] == pytest.approx(
        recall_at_k(reports, studies, (5,))[5])
    assert retrieval["best/metric/retrieval/study_to_report_recall_at_5"] == pytest.approx(
        recall_at_k(studies, reports, (5,))[5])
    assert not any("recall_at_10" in name for name in retrieval)

    # Zero-shot classification: the rows evaluate_zero_shot gives on the same loader.
    reference = evaluate_zero_shot(clip, validation_loader(ct_rate["dataset"], CLASSES), CLASSES, "cpu", ks=(5,))
    zero_shot = run_of("ct-rate-vocab-cls", "zero_shot").data.metrics
    for name in ("mean_auc", "mean_balanced_accuracy", *(f"{finding}/auc" for finding in LABELLED)):
        assert zero_shot[f"metric/zero_shot/{name}"] == pytest.approx(reference[f"metric/zero_shot/{name}"]), name
    assert math.isnan(zero_shot["metric/zero_shot/Emphysema/auc"])  # all 0: no AUC, left out of the mean
    assert "best/metric/zero_shot/mean_precision" in zero_shot

    # Vocabulary fine-tuning: 3 epochs of 2 steps; the loss falls, the best model reloads as a CLIP checkpoint.
    finetune = run_of("ct-rate-vocab-cls", "finetune")
    losses = [metric.value for metric in sorted(client.get_metric_history(finetune.info.run_id, "train_loss"),
                                                key=lambda metric: metric.step)]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert 0.0 <= finetune.data.metrics["best/metric/vocab_finetune/mean_auc"] <= 1.0
    folder = tmp_path / "runs" / "benchmark" / finetune.info.run_name
    assert clip_from_checkpoint(read_clip_checkpoint(folder / "checkpoints" / "model.pt")) is not None
    result = json.loads((folder / "result.json").read_text())
    assert result["key_metric"] == "metric/vocab_finetune/mean_auc" and "metric/vocab_finetune/mean_precision" in \
        result["metrics"]

    # The report: one row per summary metric, no published numbers for these rows; the grid resumes.
    assert main(["benchmark", "report", "--tracking_uri", uri, "--out", str(tmp_path / "results")]) == 0
    table = capsys.readouterr().out
    assert "| ct-rate-retrieval | clip_tiny | zero_shot | vit-tiny | all | report->study Recall@5 | 1 |" in table
    assert "| ct-rate-vocab-cls | clip_tiny | finetune | vit-tiny | all | VocabFine mean AUC | 1 |" in table
    vision_language_rows = [line for line in table.splitlines() if line.startswith("| ct-rate")]
    assert len(vision_language_rows) == 2 + 3 + 3 and all("| n/a |" in line for line in vision_language_rows)
    assert main(command) == 0 and "grid: 0 done, 3 skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# voco manifest reports


def test_manifest_reports_attaches_a_table_and_names_errors(ct_rate, tmp_path, capsys):
    from voco.data.folder import build_manifest_from_folder
    from voco.data.manifest import load_manifest, to_datalist

    folder = ct_rate["dataset"] / "valid" / "valid_2"  # one study folder: its volumes are the scans
    manifest, _ = build_manifest_from_folder(folder, output=tmp_path / "study.json", dataset="CT-RATE")
    table = ct_rate["dataset"] / "radiology_text_reports" / "validation_reports.csv"
    output = tmp_path / "with_reports" / "study.json"
    code = main(["manifest", "reports", str(manifest), str(table), "--output", str(output), "--id_column",
                 "VolumeName", "--report_columns", "Findings_EN,Impressions_EN"])
    assert code == 0 and "1 of 1 studies with a report, 0 with findings" in capsys.readouterr().out
    study = ct_rate["studies"]["valid_2_a"]
    entries = to_datalist(load_manifest(output))
    assert {entry["report"] for entry in entries} == {f"{study['report']}\n\n{impression(study['findings'])}"}
    assert all(Path(entry["image"]).is_file() for entry in entries)  # paths still lead to the volumes
    untouched = load_manifest(manifest)["datasets"][0]["subjects"][0]["studies"][0]
    assert "report" not in untouched  # the input is left as it was

    code = main(["manifest", "reports", str(manifest), str(tmp_path / "none.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "none.csv does not exist" in err and err.count("\n") == 1
    code = main(["manifest", "reports", str(manifest), str(table), "--report_columns", "Summary_EN"])
    err = capsys.readouterr().err
    assert code == 2 and "no column 'Summary_EN'" in err and err.count("\n") == 1

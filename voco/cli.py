"""The `voco` command (python-fire): demo, synth, manifest build/reports/ct_rate/check/stats, regions, export,
nnunet_raw, benchmark list/check/run/report.

Every sub-command catches the errors a user can cause and prints them as one sentence (exit code 2);
nothing imports this module.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from voco.bundles import run_bundle
from voco.errors import VocoError


def _print_rows(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


class ManifestCommands:
    """Describe data once: build a manifest from a folder, check every entry, summarise it."""

    def build(self, directory: str, modality: str = "CT", output: str = "manifest.json", name: str | None = None,
              preset: str | None = None, dataset: str | None = None, voxels: bool = False,
              subject_pattern: str | None = None) -> None:
        """Scan DIRECTORY for NIfTI, NRRD, MHA/MHD and DICOM series and write a manifest.

        Headers only by default (fast); --voxels also reads every voxel (catches truncated files and NaN).
        --dataset puts everything into one dataset of that name. --subject_pattern 'sub-(\\d+)' groups the scans
        whose paths (below their dataset folder) give the same first group into one subject; DICOM series are
        grouped by PatientID without it. Bad files are reported and skipped; the
        good ones are still written.
        """
        from voco.data.folder import build_manifest_from_folder

        start = time.perf_counter()
        path, problems = build_manifest_from_folder(directory, output=output, modality=modality, name=name,
                                                    preset=preset, dataset=dataset, read_voxels=voxels,
                                                    subject_pattern=subject_pattern)
        for problem in problems:
            print(f"skipped: {problem}")
        from voco.data.manifest import load_manifest, to_datalist

        count = len(to_datalist(load_manifest(path)))
        print(f"wrote {path}: {count} scans, {len(problems)} skipped, in {time.perf_counter() - start:.1f} s")

    def reports(self, manifest: str, csv: str, output: str | None = None, id_column: str | None = None,
                report_columns=None, finding_columns=None) -> None:
        """Attach the reports and findings of the table CSV to the studies of MANIFEST and write it (atomically) to
        OUTPUT (default: MANIFEST itself).

        Rows match a study by --id_column (default: the first column): a study id, a subject id or an image file
        name (CT-RATE's VolumeName). --report_columns Findings_EN,Impressions_EN (default: the columns named like
        findings, impression, report, conclusion) become the report; --finding_columns A,B (default: the columns
        of only 0/1 or true/false values) its findings.
        """
        import os

        from voco.benchmark.runs import parse_list
        from voco.data.manifest import FINDINGS_KEY, resolve_root, save_manifest
        from voco.data.reports import attach_reports

        source = Path(manifest).expanduser().resolve()
        target = Path(output).expanduser().resolve() if output else source
        reported = attach_reports(source, csv, id_column=id_column,
                                  report_columns=parse_list(report_columns) if report_columns is not None else None,
                                  finding_columns=parse_list(finding_columns) if finding_columns is not None else None)
        if target.parent != source.parent:  # image paths stay relative to the same folder, from the new place
            reported["dataset_dir"] = Path(os.path.relpath(resolve_root(reported), target.parent)).as_posix()
        save_manifest(reported, target)
        studies = [study for dataset in reported["datasets"] for subject in dataset["subjects"]
                   for study in subject["studies"]]
        print(f"wrote {target}: {sum(bool(study.get('report')) for study in studies)} of {len(studies)} studies "
              f"with a report, {sum(bool(study.get(FINDINGS_KEY)) for study in studies)} with findings")

    def ct_rate(self, directory: str, output: str = "ct_rate_manifest.json", splits="training,validation",
                unit: str = "study", labels: bool = True) -> None:
        """Build the manifest of a CT-RATE copy in DIRECTORY (its dataset/{train,valid}/<patient>/<study>/*.nii.gz,
        radiology_text_reports/*.csv and multi_abnormality_labels/*.csv): one study per study folder (--unit volume:
        per volume) with its report and, with --labels (default), the 18 abnormality findings; scans carry their
        split. --splits validation reads the validation part only."""
        from voco.benchmark.registry import get_task
        from voco.benchmark.runs import parse_list
        from voco.benchmark.ct_rate import build_ct_rate_manifest
        from voco.data.manifest import to_datalist
        from voco.data.studies import group_studies

        names = get_task("ct-rate-vocab-cls").class_names if labels else ()
        manifest = build_ct_rate_manifest(directory, splits=parse_list(splits), unit=unit, finding_names=names,
                                          output=output)
        datalist = to_datalist(manifest)
        print(f"wrote {Path(output).resolve()}: {len(group_studies(datalist))} studies, {len(datalist)} volumes")

    def check(self, manifest: str, dataset_dir: str | None = None, voxels: bool = True) -> None:
        """Validate every entry of MANIFEST (readable, 3-D, not empty, finite spacing and voxels); exit 1 on problems."""
        from voco.data.manifest_checks import check_manifest, format_problem_table

        rows = check_manifest(manifest, dataset_dir=dataset_dir, read_voxels=voxels)
        print(format_problem_table(rows))
        if rows:
            raise SystemExit(1)

    def stats(self, manifest: str, dataset_dir: str | None = None) -> None:
        """Counts, shapes and spacings per dataset of MANIFEST."""
        from voco.data.manifest_checks import manifest_stats

        print(manifest_stats(manifest, dataset_dir=dataset_dir))


class BenchmarkCommands:
    """The downstream benchmark: list the tasks, check a dataset copy, run the fine-tuning grid, report results."""

    def list(self, task_type: str | None = None, modality: str | None = None) -> None:
        """Print the task registry as a table (filter with --task_type segmentation|classification|... --modality CT|MR)."""
        from voco.benchmark.registry import format_task_table, task_rows

        print(format_task_table(task_rows(task_type=task_type, modality=modality)))

    def check(self, task: str, dataset_dir: str | None = None, voxels: bool = True,
              datalist: str | None = None, pretrained: str | None = None) -> None:
        """Verify that DATASET_DIR holds a complete, readable copy of TASK (its datalist, images, labels; for the
        CT-RATE tasks the volumes and the report / label tables); exit 1 if not.

        TASK: a registry id (voco benchmark list), or your own dataset: the path of its dataset.json (Decathlon /
        MSD style: labels, modality, training, validation) or of a voco manifest with label maps; its folder is
        then the default DATASET_DIR.
        --datalist FILE: a Decathlon-style JSON other than the task's own (relative to DATASET_DIR).
        --pretrained ENC.pt: also say how many of the task's images that encoder was pretrained on (an export of
        voco carries the fingerprints of its pretraining volumes)."""
        from voco.benchmark.checks import check_task_dataset
        from voco.benchmark.own_data import default_dataset_dir, resolve_task
        from voco.data.manifest_checks import format_problem_table

        resolved = resolve_task(task)
        dataset_dir = dataset_dir if dataset_dir is not None else default_dataset_dir(task)
        if resolved.provenance.get("own_dataset"):
            print(f"task {resolved.id}: {resolved.task_type} of {resolved.num_classes} classes "
                  f"({', '.join(resolved.class_names)}), {resolved.in_channels} channel(s), "
                  f"{resolved.provenance['preset']} preprocessing, roi {list(resolved.roi_size)}")
        rows = check_task_dataset(resolved, dataset_dir, read_voxels=voxels, datalist=datalist)
        print(format_problem_table(rows))
        if pretrained is not None:
            from voco.benchmark.leakage import leakage_sentence, seen_in_pretraining

            if not Path(pretrained).expanduser().is_file():
                raise VocoError(f"the encoder {pretrained} does not exist; give the path of an exported encoder.")
            result = seen_in_pretraining(resolved, dataset_dir, pretrained, datalist)
            print(("warning: " if result and result["seen"] else "") + leakage_sentence(resolved, pretrained, result))
        if rows:
            raise SystemExit(1)

    def run(self, tasks, pretrained="scratch", seeds=0, dataset_dir=None, config: str = "train",
            training_cases: int | None = None, max_epochs: int | None = None, size: str | None = None,
            backbone: str | None = None, modes=None, val_interval: int | None = None,
            tracking_uri: str | None = None, vit_layout: str | None = None,
            vit_window_size: int | None = None, learning_rate: float | None = None,
            datalist: str | None = None, preset: str | None = None, spacing=None, roi_size=None,
            channel_adaptation: str | None = None) -> None:
        """Fine-tune every task from every encoder with every seed; finished cells are skipped (resumable).

        --tasks btcv,msd-task09-spleen --pretrained a.pt,b.pt,scratch --seeds 0,1,2
        Your own labelled data: --tasks my_data/dataset.json (a Decathlon / MSD-style dataset.json, or a voco
        manifest with label maps); its folder is the dataset folder, its name the task's name, and the report
        shows no published number for it. --preset ct_abdomen|ct_chest|mr_zscore|... --spacing 1.5,1.5,1.5
        --roi_size 96,96,96 change its preprocessing (the registry tasks' too).
        --channel_adaptation mean|repeat|first|none: how a one-channel encoder serves a task of several channels.
        --dataset_dir DIR (one folder) or btcv=DIR,msd-task09-spleen=DIR; not needed with --config smoke.
        --config train|smoke (smoke: a tiny model on phantoms it makes, for phantom-seg / phantom-cls / phantom-reg).
        --modes finetune,frozen,linear_probe (how each checkpoint is used; default finetune).
        --backbone swin|vit|resenc --size B|L|tiny: the network; by default each checkpoint's pretraining plan
        (scratch: the first checkpoint's; without one Swin-B, tiny with --config smoke); the plan's preprocessing
        too, where the task allows (--preset task keeps the task's); every difference is named in the run's log.
        --training_cases N (few-label setting) --max_epochs N.
        --vit_layout window --vit_window_size 3: a ViT encoder's attention layout (default: its pretraining's).
        --learning_rate: another learning rate than the configuration's.
        --datalist FILE: a Decathlon-style JSON other than the task's own (relative to its dataset folder; one task).
        ct-rate-retrieval, ct-rate-vocab-cls: --pretrained a CLIP checkpoint of bundles/clip_pretrain, --dataset_dir
        the CT-RATE copy; modes zero_shot (retrieval, zero-shot classification) and finetune (vocabulary
        fine-tuning), both by default for ct-rate-vocab-cls; backbone and size come from the checkpoint.
        Each cell is an MLflow run in experiment benchmark-<task>; exit 1 if a cell failed.
        """
        from voco.benchmark.own_data import is_dataset_path
        from voco.benchmark.runs import parse_dataset_dirs, parse_list, plan_grid, run_grid

        name = str(config).removesuffix(".json")
        config_files = ["train.json"] + ([] if name == "train" else [f"{name}.json"])
        if dataset_dir is None and name == "train" and not all(map(is_dataset_path, parse_list(tasks))):
            raise VocoError("the benchmark needs --dataset_dir: the folder of the task's dataset, or task=folder pairs "
                            "such as btcv=/data/BTCV,msd-task09-spleen=/data/Task09_Spleen (`voco benchmark check` "
                            "verifies one).")
        if datalist is not None and len(parse_list(tasks)) != 1:
            raise VocoError(f"--datalist {datalist} names the datalist of one task; run the tasks "
                            f"{', '.join(map(str, parse_list(tasks)))} one at a time.")
        cells = plan_grid(parse_list(tasks), parse_list(pretrained), seeds=parse_list(seeds),
                          modes=parse_list(modes) or None, backbone=backbone, size=size,
                          training_cases=training_cases, default_size="tiny" if "smoke.json" in config_files else None)
        overrides = {key: value for key, value in (("max_epochs", max_epochs), ("val_interval", val_interval),
                                                   ("vit_layout", vit_layout), ("vit_window_size", vit_window_size),
                                                   ("learning_rate", learning_rate), ("datalist", datalist),
                                                   ("preset", preset), ("spacing", _numbers(spacing)),
                                                   ("roi_size", _numbers(roi_size)),
                                                   ("channel_adaptation", channel_adaptation))
                     if value is not None}
        print(f"benchmark grid: {len(cells)} run{'' if len(cells) == 1 else 's'}")
        rows = run_grid(cells, dataset_dirs=parse_dataset_dirs(dataset_dir), tracking_uri=tracking_uri,
                        config_files=config_files, overrides=overrides)
        print("see the results with `voco benchmark report`")
        if any(row["status"] == "failed" for row in rows):
            raise SystemExit(1)

    def evaluate(self, run: str, dataset_dir: str | None = None, datalist: str | None = None) -> None:
        """Evaluate a trained run's best model again, with the network, preprocessing and data it was trained with
        (read from RUN/settings.json): metrics in RUN/evaluation/metrics.csv, a picture of a case.

        RUN: runs/benchmark/<run name> (or its checkpoints/model.pt). --dataset_dir / --datalist: other data of the
        same task (its validation list is evaluated)."""
        self._trained_run(run, "evaluate.json", dataset_dir=dataset_dir, datalist=datalist)

    def infer(self, run: str, images=None, dataset_dir: str | None = None, datalist: str | None = None) -> None:
        """Predict label maps with a trained run's best model (network and preprocessing from RUN/settings.json) into
        RUN/predictions, each on its image's own grid: the validation images of the run's datalist, or
        --images a.nii.gz,b.nii.gz."""
        from voco.benchmark.runs import parse_list

        files = [str(Path(image).expanduser().resolve()) for image in parse_list(images)] or None
        self._trained_run(run, "inference.json", dataset_dir=dataset_dir, datalist=datalist, images=files)

    @staticmethod
    def _trained_run(run: str, config: str, **overrides) -> None:
        from voco.benchmark.finetune import read_trained_settings
        from voco.benchmark.own_data import resolve_task

        settings, folder = read_trained_settings(run)
        task_type = resolve_task(settings["task"]).task_type
        if task_type not in ("segmentation", "classification"):
            raise VocoError(f"{folder} is a {task_type} run; `voco benchmark evaluate / infer` take segmentation and "
                            f"classification runs.")
        settings.update({key: value for key, value in overrides.items() if value is not None})
        run_bundle("downstream_benchmark", ["train.json", config], **settings)
        print(f"wrote {folder / ('evaluation' if config == 'evaluate.json' else 'predictions')}")

    def report(self, out: str = "results", tasks=None, tracking_uri: str | None = None) -> None:
        """Print the results table (mean ± std over seeds beside the published number) and write
        OUT/results.csv, results.md and results.png. --tasks btcv,... limits it to some tasks."""
        from voco.benchmark.report import collect_results, format_markdown, summarize, write_report
        from voco.benchmark.runs import parse_list
        from voco.tracking import default_tracking_uri

        uri, wanted = tracking_uri or default_tracking_uri(), parse_list(tasks)
        rows = collect_results(uri, tasks=wanted or None)
        if not rows:
            which = f" of {', '.join(wanted)}" if wanted else ""
            raise VocoError(f"{uri} holds no finished benchmark runs{which}; run `voco benchmark run --tasks ... "
                            f"--pretrained ...` first, or give the store with --tracking_uri.")
        summary = summarize(rows)
        paths = write_report(summary, out)
        print(format_markdown(summary), end="")
        print(f"{len({row['run_id'] for row in rows})} runs; wrote {', '.join(str(path) for path in paths.values())}")


class VocoCommands:
    """voco: self-supervised pretraining of 3-D medical image encoders (MONAI bundles, MLflow)."""

    def __init__(self) -> None:
        self.manifest = ManifestCommands()
        self.benchmark = BenchmarkCommands()

    def synth(self, out: str, n: int = 20, seed: int = 0, studies: int | None = None) -> None:
        """Write N synthetic CT phantoms (NIfTI, HU, label maps, reports) and their manifest into OUT; --studies N
        writes N phantom studies instead (1-4 series of one body each, one report and findings per study)."""
        from voco.data.phantoms import synthesize, synthesize_studies

        start = time.perf_counter()
        if studies is not None:
            manifest = synthesize_studies(out, n=studies, seed=seed)
            print(f"wrote {studies} phantom studies and {manifest} in {time.perf_counter() - start:.1f} s")
            return
        manifest = synthesize(out, n=n, seed=seed)
        print(f"wrote {n} phantoms and {manifest} in {time.perf_counter() - start:.1f} s")

    def regions(self, manifest: str, preset: str | None = None, region_size: tuple = (192, 192, 64),
                batch_size: int = 2, batches: int = 2, num_workers: int = 0, dataset_dir: str | None = None) -> None:
        """Run the region pipeline over MANIFEST for a few batches and print what it delivers."""
        summary = summarize_regions(manifest, preset=preset, region_size=region_size, batch_size=batch_size,
                                    batches=batches, num_workers=num_workers, dataset_dir=dataset_dir)
        _print_rows([summary], list(summary))

    def export(self, source: str, out: str, format: str = "voco", plans: str | None = None,
               configuration: str | None = None, add_configuration: str | None = None) -> None:
        """Write the encoder of SOURCE (a training checkpoint or run folder) in the official VoCo key format, with its
        pretraining facts beside it (OUT.provenance.json).

        --format nnunet --plans nnUNetResEncUNetLPlans.json --configuration 3d_fullres: a ResEnc run as nnU-Net
        pretrained weights (nnUNetv2_train ... -pretrained_weights OUT); --add_configuration 3d_fullres_voco: where
        the plan's architecture differs from the encoder's, a copy of the plans with that configuration added."""
        from voco.checkpoints.exports import export_run

        export_run(source, out, format, plans, configuration, add_configuration)

    def nnunet_raw(self, source: str, out: str | None = None, dataset_id: int | None = None,
                   name: str | None = None) -> None:
        """Convert a Decathlon-style dataset (an MSD task folder, a phantom task, your own dataset.json: its folder or
        the JSON file) to nnU-Net's raw format in OUT (default: $nnUNet_raw) as Dataset<ID>_<NAME>."""
        from voco.data.nnunet_raw import decathlon_to_nnunet_raw

        target = decathlon_to_nnunet_raw(source, out, dataset_id, name)
        print(f"wrote {target}; plan it with: nnUNetv2_plan_and_preprocess -d {int(target.name.split('_')[0][7:])} "
              f"-pl nnUNetPlannerResEncL")

    def demo(self, out: str = "demo_output", phantoms: int = 8, seed: int = 0, pretrain_steps: int = 60,
             finetune_steps: int = 150, training_cases: int = 2) -> None:
        """The main job end to end on generated data: phantoms -> manifest -> regions -> VoCo pretraining (tiny
        model, MLflow, the frozen-encoder probe at step 0 and at the end) -> exported encoder -> fine-tuning on the
        phantom segmentation task with TRAINING_CASES labelled cases, from scratch and from the pretrained encoder
        -> comparison table, beside the benefit the benchmark measured."""
        from voco.checkpoints import export_encoder
        from voco.data.folder import build_manifest_from_folder
        from voco.data.phantoms import ensure_phantoms
        from voco.engine import latest_checkpoint
        from voco.tracking import default_run_name, default_tracking_uri, read_run_metrics

        out_dir = Path(out).resolve()
        start = time.perf_counter()
        manifest = ensure_phantoms(out_dir / "phantoms", n=phantoms, seed=seed)
        print(f"[1/6] {phantoms} CT phantoms and their manifest: {manifest}")
        scanned, problems = build_manifest_from_folder(out_dir / "phantoms" / "images",
                                                       output=out_dir / "scanned_manifest.json", modality="CT")
        print(f"[2/6] `voco manifest build` of the phantom folder: {scanned} ({len(problems)} problems)")
        summary = summarize_regions(manifest, region_size=(64, 64, 64), batch_size=2, batches=2, num_workers=0)
        print("[3/6] region pipeline (preset ct_abdomen, region 64 x 64 x 64):")
        _print_rows([summary], list(summary))
        run_name = default_run_name("demo-voco", "tiny")
        tracking_uri = default_tracking_uri()
        print(f"[4/6] VoCo pretraining of a tiny SwinUNETR encoder (bundles/voco_pretrain, smoke settings, "
              f"{pretrain_steps} steps, the frozen-encoder probe at step 0 and at the end), MLflow run {run_name!r}:")
        run_bundle("voco_pretrain", ["train.json", "smoke.json"], manifest=str(manifest), run_name=run_name,
                   tracking="mlflow", tracking_uri=tracking_uri, max_steps=pretrain_steps,
                   warmup_steps=max(pretrain_steps // 10, 1), val_interval=pretrain_steps,
                   checkpoint_interval=pretrain_steps)
        (pretraining,) = read_run_metrics(tracking_uri, "voco_pretrain", run_name)
        checkpoint = latest_checkpoint(Path("runs") / run_name / "checkpoints")
        encoder, count = export_encoder(checkpoint, out_dir / "voco_encoder.pt")
        print(f"[5/6] exported {count} encoder tensors to {encoder} (they load into MONAI SwinUNETR(use_v2=True, "
              f"feature_size=12, window_size=2), the smoke settings)")
        print(f"[6/6] fine-tuning on the phantom segmentation task (bundles/downstream_benchmark, small settings, "
              f"{training_cases} labelled cases, {finetune_steps} steps), from scratch and from the pretrained "
              f"encoder:")
        rows = []
        for pretrained in ("scratch", str(encoder)):
            from voco.benchmark.cells import run_name as cell_name

            name = cell_name("phantom-seg", pretrained, "scratch" if pretrained == "scratch" else "finetune",
                             "swin", "tiny", seed, training_cases) + time.strftime("-%H%M%S")
            run_bundle("downstream_benchmark", ["train.json", "small.json"], pretrained=pretrained, seed=seed,
                       run_name=name, tracking="mlflow", tracking_uri=tracking_uri, training_cases=training_cases,
                       epoch_length=finetune_steps // 2, max_epochs=2, val_interval=2)
            (finetuned,) = read_run_metrics(tracking_uri, "benchmark-phantom-seg", name)
            probe = pretraining["metrics"]["probe/dice_at_init" if pretrained == "scratch" else "probe/dice"]
            rows.append({"encoder": "random init (scratch)" if pretrained == "scratch" else "VoCo-pretrained",
                         "frozen probe Dice": f"{probe:.3f}",
                         "fine-tuned large-organ Dice": f"{finetuned['metrics']['metric/dice/large_organs']:.3f}",
                         "MLflow run": name})
        _print_rows(rows, list(rows[0]))
        print(demo_verdict(rows))
        print(f"demo finished in {time.perf_counter() - start:.0f} s. Browse the runs with:\n"
              f"    .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")


def _numbers(value: object) -> list | None:
    """--spacing / --roi_size as a list of numbers: fire gives "1.5,1.5,1.5" as a tuple, "96" as a number."""
    from voco.benchmark.runs import parse_list

    if value is None:
        return None
    numbers = []
    for part in parse_list(value):
        try:
            number = float(part)
        except ValueError:
            raise VocoError(f"{part!r} in {value!r} is not a number; give three numbers such as 96,96,96.") from None
        numbers.append(int(number) if number.is_integer() and "." not in part else number)
    return numbers


def demo_verdict(rows: list[dict], results: str | Path = Path("benchmarks") / "results" / "benchmark.json") -> str:
    """What the demo's two rows show, and the benefit the benefit benchmark measured over seeds (its table)."""
    probe = 100 * (float(rows[1]["frozen probe Dice"]) - float(rows[0]["frozen probe Dice"]))
    tuned = 100 * (float(rows[1]["fine-tuned large-organ Dice"]) - float(rows[0]["fine-tuned large-organ Dice"]))
    lines = [f"pretrained - scratch: {probe:+.1f} Dice points on the frozen probe, {tuned:+.1f} after fine-tuning "
             f"(one seed, one short run: differences of a few points are within the seed-to-seed spread)."]
    path = Path(results)
    if path.is_file():
        import json
        import statistics

        measured = json.loads(path.read_text())
        voco, scratch = measured["probe"].get("voco"), measured["probe"].get("scratch_swin")
        if voco and scratch:
            differences = [100 * (a - b) for a, b in zip(voco["dice"], scratch["dice"])]
            lines.append(f"measured by benchmarks/pretraining_benefit.py over {len(differences)} seeds: VoCo - "
                         f"scratch {statistics.mean(differences):+.1f} probe Dice points (per seed "
                         f"{' / '.join(f'{d:+.1f}' for d in differences)}); fine-tuning and every pretext in "
                         f"{path.with_suffix('.md')}.")
    else:
        lines.append("the measured comparison over seeds: `python benchmarks/pretraining_benefit.py` (its table in "
                     "benchmarks/results/benchmark.md).")
    return "\n".join(lines)


def summarize_regions(manifest: str, *, preset: str | None = None, region_size=(192, 192, 64), batch_size: int = 2,
                      batches: int = 2, num_workers: int = 0, dataset_dir: str | None = None) -> dict:
    """Pull a few batches from the region loader and describe them (shape, value range, skipped, time)."""
    from voco.data.regions import build_region_loader

    loader = build_region_loader(manifest, preset=preset, region_size=tuple(region_size), batch_size=batch_size,
                                 num_workers=num_workers, dataset_dir=dataset_dir, drop_last=False)
    start, seen, skipped, low, high, shape = time.perf_counter(), 0, 0, float("inf"), float("-inf"), None
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        image = batch["image"]
        shape, seen = tuple(image.shape), seen + image.shape[0]
        skipped += int(batch["skipped_volumes"].sum())
        low, high = min(low, float(image.min())), max(high, float(image.max()))
    elapsed = time.perf_counter() - start
    return {"volumes": len(loader.dataset), "batch shape": shape, "value range": f"[{low:.2f}, {high:.2f}]",
            "skipped volumes": skipped, "ms per volume": f"{1000 * elapsed / max(seen, 1):.0f}"}


def check_options(commands: object, argv: list[str]) -> None:
    """Refuse an option the chosen command does not take, before it runs: fire would run the command with the
    options it knows and only then complain (``voco manifest build DIR --ouptut x.json`` wrote ./manifest.json).

    Raises:
        ConfigError: naming the option and, where one is close, the option meant.
    """
    import difflib
    import inspect

    from voco.errors import ConfigError

    target, words = commands, []
    for argument in argv:  # the command's words lead through the command groups to the function
        if argument.startswith("-") or not hasattr(target, argument) or argument.startswith("_"):
            break
        target, words = getattr(target, argument), words + [argument]
    if not callable(target) or inspect.isclass(target):
        return
    parameters = inspect.signature(target).parameters
    if any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    names = set(parameters)
    for argument in argv[len(words):]:
        if argument == "--":  # fire's own flags (--help, --trace ...) follow it
            break
        if not argument.startswith("--") or argument in ("--help", "--helpfull"):
            continue
        name = argument[2:].split("=", 1)[0].replace("-", "_")
        if name in names or (name.startswith("no") and name[2:] in names):  # fire's --noflag for a boolean
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else f"it takes {', '.join(f'--{n}' for n in sorted(names))}."
        raise ConfigError(f"voco {' '.join(words)} has no option --{name}, so nothing was done; {hint}")


def main(argv: list[str] | None = None) -> int:
    import fire

    try:
        commands = VocoCommands()
        check_options(commands, list(sys.argv[1:] if argv is None else argv))
        fire.Fire(commands, command=argv, name="voco")
    except VocoError as error:
        print(f"voco: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("voco: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

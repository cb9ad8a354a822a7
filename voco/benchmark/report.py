"""The benchmark results: finished fine-tuning runs read back from MLflow, summarised over seeds, set beside the
numbers the reference publishes, and written as a table (CSV, markdown) and a picture (PNG)::

    rows = collect_results()                       # one row per finished run of every benchmark-* experiment
    summary = summarize(rows)                      # one row per task × encoder × mode × backbone × size × cases
    paths = write_report(summary, "results")       # results.csv, results.md, results.png
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from voco.errors import ConfigError, optional_import
from voco.files import atomic_write

GROUP_KEYS = ("task", "encoder", "mode", "backbone", "size", "training_cases")
CSV_COLUMNS = ("task", "encoder", "mode", "backbone", "size", "training_cases", "key_metric", "n", "seeds", "mean",
               "std", "reference", "reference_method", "reference_metric", "difference", "seen_in_pretraining")
# which reference metric our key metric can be compared with (the reference reports percentages)
COMPARABLE = {"metric/dice": "dice", "metric/auc": "auc"}


def _optional_int(value: Any) -> int | None:
    if value in (None, "", "None", "none", "null"):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def collect_results(tracking_uri: str | None = None, tasks: Iterable[str] | None = None) -> list[dict]:
    """One row per finished benchmark run (status FINISHED with a ``best/`` metric) in the MLflow store.

    Args:
        tracking_uri: the store (default: `voco.tracking.default_tracking_uri()`).
        tasks: only these task ids (experiments ``benchmark-<task>``); default: every ``benchmark-*`` experiment.

    Returns:
        rows {"task", "encoder", "mode", "backbone", "size", "seed", "training_cases", "key_metric", "best",
        "max_epochs", "task_source", "run_name", "run_id", "start_time"}, oldest run first (task_source: the dataset
        file of a user's own task, "" for a registry task); `best` in [0, 1] as logged. A run that
        lists several metrics in its tag ``voco.report_metrics`` (the vision-language tasks: Recall@K, mean AUC,
        ...) gives one row per metric it holds a ``best/`` value of.
    """
    from voco.benchmark.runs import EXPERIMENT_PREFIX, finished_runs

    names = None
    if tasks is not None:
        names = [EXPERIMENT_PREFIX + _task_name(str(task)) for task in tasks]
    rows = []
    for run in finished_runs(tracking_uri, names):
        tags, metrics = run.data.tags, run.data.metrics
        key = tags.get("voco.key_metric")
        if key is None or f"best/{key}" not in metrics:
            key = next(name for name in sorted(metrics) if name.startswith("best/"))[len("best/"):]
        reported = [name for name in tags.get("voco.report_metrics", "").split(",") if f"best/{name}" in metrics]
        for name in reported or [key]:
            rows.append({
                "task": tags.get("voco.task", "?"),
                "encoder": tags.get("voco.encoder", "?"),
                "mode": tags.get("voco.mode", "?"),
                "backbone": tags.get("voco.backbone", "?"),
                "size": tags.get("voco.size", "?"),
                "seed": _optional_int(tags.get("voco.seed")),
                "training_cases": _optional_int(tags.get("voco.training_cases")),
                "key_metric": name,
                "best": float(metrics[f"best/{name}"]),
                "max_epochs": _optional_int(tags.get("voco.max_epochs")),
                "task_source": tags.get("voco.task_source", ""),
                "seen_in_pretraining": tags.get("voco.seen_in_pretraining", ""),
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
                "start_time": run.info.start_time,
            })
    return rows


def _task_name(spec: str) -> str:
    """The experiment's task name of a `--tasks` entry: a registry id, a user's dataset file (its derived name),
    or the name of a user's task as the runs recorded it."""
    from voco.benchmark.own_data import is_dataset_path, task_from_dataset
    from voco.benchmark.registry import get_task

    if is_dataset_path(spec):
        return task_from_dataset(spec).id
    try:
        return get_task(spec).id
    except ConfigError:
        return spec


def reference_for(task_id: str, key_metric: str) -> dict | None:
    """The published number to set beside ours: {"value", "method", "metric", "source"}, or None.

    The best VoCo number where the reference reports one for the task (methods named "VoCo..."), else its best
    number of any method (`voco.benchmark.registry.reference_number`); None for a task without published numbers,
    an unknown task, or a metric other than ours (e.g. HD95 beside our Dice).
    """
    from voco.benchmark.registry import get_task, reference_number

    try:
        task = get_task(task_id)
    except ConfigError:
        return None
    results = task.reference_results
    if not results or not results.get("values"):
        return None
    kind = COMPARABLE.get(key_metric)
    if kind is None or kind not in str(results.get("metric", "")).lower():
        return None
    values = results["values"]
    voco = {method: value for method, value in values.items() if method.lower().startswith("voco")}
    if voco:
        method = max(voco, key=lambda name: voco[name])
        value = reference_number(task, method)
    else:
        value = reference_number(task)
        method = next(name for name, number in values.items() if float(number) == value)
    return {"value": float(value), "method": method, "metric": results.get("metric"), "source": results.get("source")}


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Group the runs by task, encoder, mode, backbone, size and training cases, over seeds.

    A seed run more than once counts once (its latest run). `mean` and `std` (the sample standard deviation over
    seeds; None for one seed) are of `best` in percent; `reference` is the published number (`reference_for`, in
    percent as published) and `difference` = mean - reference, in percentage points. A user's own dataset
    (`own_data`) has no reference, whatever its name.

    Returns:
        rows {"task", "encoder", "mode", "backbone", "size", "training_cases", "key_metric", "n", "own_data",
        "seeds", "mean", "std", "reference", "reference_method", "reference_metric", "difference"}, sorted by task, then encoder
        (scratch last), mode, backbone, size, training cases.
    """
    groups: dict[tuple, dict[Any, Mapping[str, Any]]] = defaultdict(dict)
    for row in sorted(rows, key=lambda row: row.get("start_time") or 0):
        group = tuple(row.get(key) for key in GROUP_KEYS) + (row.get("key_metric"),)
        groups[group][row.get("seed")] = row  # the latest run of a seed wins
    summary = []
    for group, by_seed in groups.items():
        values = dict(zip(GROUP_KEYS + ("key_metric",), group))
        percents = [100.0 * float(row["best"]) for row in by_seed.values()]
        mean = statistics.fmean(percents)
        std = statistics.stdev(percents) if len(percents) > 1 else None
        own_data = any(row.get("task_source") for row in by_seed.values())
        seen = next((row["seen_in_pretraining"] for row in by_seed.values() if row.get("seen_in_pretraining")), "")
        reference = None if own_data else reference_for(values["task"], values["key_metric"])
        summary.append({**values, "n": len(percents), "own_data": own_data, "seen_in_pretraining": seen,
                        "seeds": sorted(by_seed, key=lambda seed: (seed is None, seed if seed is not None else 0)),
                        "mean": mean, "std": std,
                        "reference": reference["value"] if reference else None,
                        "reference_method": reference["method"] if reference else None,
                        "reference_metric": reference["metric"] if reference else None,
                        "difference": mean - reference["value"] if reference else None})

    def order(row: Mapping[str, Any]) -> tuple:
        return (row["task"], row["encoder"] == "scratch", str(row["encoder"]), str(row["mode"]), str(row["backbone"]),
                str(row["size"]), row["training_cases"] is not None, row["training_cases"] or 0)

    return sorted(summary, key=order)


def _number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def metric_label(key_metric: str) -> str:
    """``metric/dice`` -> ``Dice``; ``metric/auc`` -> ``AUC``; ``metric/zero_shot/mean_auc`` -> ``zero-shot mean
    AUC``; ``metric/retrieval/report_to_study_recall_at_50`` -> ``report->study Recall@50``."""
    parts = str(key_metric).split("/")
    name = parts[-1]
    recall = re.fullmatch(r"([a-z]+)_to_([a-z]+)_recall_at_(\d+)", name)
    if recall:
        return f"{recall[1]}->{recall[2]} Recall@{recall[3]}"
    words = {"dice": "Dice", "auc": "AUC"}.get(name) or name.replace("_", " ").replace("auc", "AUC")
    family = {"zero_shot": "zero-shot ", "vocab_finetune": "VocabFine "}.get(parts[1] if len(parts) > 2 else "", "")
    return family + words


def _reference_text(row: Mapping[str, Any]) -> str:
    """The published number; "no published number" for a user's own dataset, "n/a" where the reference publishes
    none for the task, "-" where its number is of another metric than ours."""
    if row.get("own_data"):
        return "no published number"
    if row["reference"] is not None:
        return _number(row["reference"])
    from voco.benchmark.registry import get_task, reference_number

    try:
        published = reference_number(get_task(str(row["task"]))) is not None
    except ConfigError:
        published = True  # a task this registry does not know: nothing to say about its publications
    return "-" if published else "n/a"


def _notes(row: Mapping[str, Any]) -> str:
    """What qualifies the number: task images the encoder was pretrained on (`voco.benchmark.leakage`)."""
    seen = str(row.get("seen_in_pretraining") or "")
    if seen and not seen.startswith("0/"):
        return f"{seen} images seen in pretraining"
    return ""


def format_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a markdown table: ours (mean ± std over seeds, %) beside the published number ("n/a" where
    the reference publishes none for the task)."""
    header = ["task", "encoder", "mode", "backbone", "training cases", "metric", "seeds", "ours (%)",
              "reference (%)", "reference method", "ours - reference", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 5 + ["---", "---:", "---:", "---:", "---",
                                                                            "---:", "---"]) + "|"]
    for row in summary:
        ours = _number(row["mean"]) + ("" if row["std"] is None else f" ± {_number(row['std'])}")
        cells = [row["task"], row["encoder"], row["mode"], f"{row['backbone']}-{row['size']}",
                 "all" if row["training_cases"] is None else str(row["training_cases"]),
                 metric_label(row["key_metric"]), str(row["n"]), ours, _reference_text(row),
                 row["reference_method"] or "-", _number(row["difference"], signed=True), _notes(row)]
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(summary: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in summary:
        values = {column: row.get(column) for column in CSV_COLUMNS}
        values["seeds"] = " ".join(str(seed) for seed in row.get("seeds", []))
        for column in ("mean", "std", "reference", "difference"):
            values[column] = "" if values[column] is None else f"{values[column]:.4f}"
        values = {column: "" if value is None else value for column, value in values.items()}
        writer.writerow(values)
    return buffer.getvalue()


def _series_label(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    label = row["encoder"] if row["encoder"] == row["mode"] else f"{row['encoder']}/{row['mode']}"
    if "backbone" in varying or "size" in varying:
        label += f" {row['backbone']}-{row['size']}"
    if "training_cases" in varying:
        label += f" {row['training_cases']} cases" if row["training_cases"] is not None else " all cases"
    return label


def draw_chart(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """A grouped bar chart as PNG: tasks on x (one group per task and metric where a task reports several, as the
    vision-language tasks do), one bar per encoder/mode (mean over seeds, std error bars), the published number of
    each task as a black marker."""
    figure_module = optional_import("matplotlib.figure", "drawing the benchmark chart")
    groups = list(dict.fromkeys((row["task"], row["key_metric"]) for row in summary))
    several = len({task for task, _ in groups}) < len(groups)  # some task reports several metrics
    labels = [f"{task}\n{metric_label(metric)}" if several else task for task, metric in groups]
    varying = [key for key in ("backbone", "size", "training_cases")
               if len({row[key] for row in summary}) > 1]
    series = list(dict.fromkeys(_series_label(row, varying) for row in summary))
    values = {(row["task"], row["key_metric"], _series_label(row, varying)): row for row in summary}
    width = 0.8 / max(len(series), 1)
    figure = figure_module.Figure(figsize=(max(5.0, 1.1 + len(groups) * (0.5 + 0.35 * len(series))), 4.2))
    axis = figure.add_subplot(1, 1, 1)
    for number, name in enumerate(series):
        positions, heights, errors = [], [], []
        for index, group in enumerate(groups):
            row = values.get((*group, name))
            if row is None:
                continue
            positions.append(index - 0.4 + width * (number + 0.5))
            heights.append(row["mean"])
            errors.append(row["std"] if row["std"] is not None else float("nan"))  # one seed: no error bar
        axis.bar(positions, heights, width * 0.92, yerr=errors, capsize=3, label=name)
    labelled = False
    for index, group in enumerate(groups):
        reference = next((row for row in summary if (row["task"], row["key_metric"]) == group
                          and row["reference"] is not None), None)
        if reference is not None:
            axis.plot([index - 0.42, index + 0.42], [reference["reference"]] * 2, color="black", linewidth=1.5,
                      linestyle="--", label=None if labelled else "published")
            axis.plot(index, reference["reference"], marker="D", color="black", markersize=6)
            labelled = True
    metrics = sorted({metric_label(row["key_metric"]) for row in summary})
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(labels, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center",
                         fontsize=8 if several else None)
    axis.set_ylabel(f"{' / '.join(metrics) if len(metrics) <= 3 else 'metric'} (%), mean ± std over seeds")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    axis.set_title("downstream benchmark")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)


def write_report(summary: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike = "results") -> dict[str, Path]:
    """Write results.csv, results.md and results.png into `out_dir`, each atomically (a temporary file renamed
    into place once all three are written: no partial report is left behind).

    Returns:
        {"csv": path, "markdown": path, "png": path}.
    """
    if not summary:
        raise ConfigError("there are no benchmark results to write; run `voco benchmark run` first.")
    folder = Path(out_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    targets = {"csv": folder / "results.csv", "markdown": folder / "results.md", "png": folder / "results.png"}
    with contextlib.ExitStack() as files:  # the three are renamed into place only when all are written
        temporary = {kind: files.enter_context(atomic_write(target)) for kind, target in targets.items()}
        temporary["csv"].write_text(format_csv(summary), encoding="utf-8")
        temporary["markdown"].write_text(format_markdown(summary), encoding="utf-8")
        draw_chart(summary, temporary["png"])
    return targets

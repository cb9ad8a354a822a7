"""What each MG-3D part adds to CLIP: an ablation on phantom studies with reports (issue 20, item 3).

Configs (the six loss weights of bundles/mg3d_pretrain; a part not named is 0, so it is neither built nor run):

    clip        CML alone, 0.1: the volume pool against the report pool, symmetric InfoNCE at tau 0.1 (CLIP's loss)
    clip+mlm    CML 0.1 + MLM 1.0        clip+sfr   CML 0.1 + SFR 0.1        clip+mim   CML 0.1 + MIM 1.0
    clip+dfa    CML 0.1 + DFA 0.1        clip+ssm   CML 0.1 + SSM 0.1
    mg3d        all six at MG-3D's weights: (MLM + 0.1 SFR) + MIM + 0.1 (CML + DFA + SSM)

"CLIP alone" is MG-3D with CML alone, not clip_pretrain's `CLIPPretext`: the same encoders, adapters, pools, heads,
fixed temperature, optimizer, data and steps, so a difference belongs to the part added, not to another
architecture (the CLS token, the learnable temperature and the text pooling of `CLIPPretext` would differ too). Each
part keeps its MG-3D weight, so the "mg3d" row is the sum of the single additions.

Each (config, seed) pretrains with the bundle itself (train.json + smoke.json, in this process through
`voco.bundles.run_bundle`) on the same phantom studies of one axial scan each (`SETTINGS`: a 4-block tiny ViT, the
whole body resized to 32 x 32 x 16, the preset's [0, 1] seen by the ViT as (x - 0.5) / 0.125, batch 8, lr 2e-4;
MG-3D pairs one volume with its report). Without that input map CLIP alone never leaves chance here: the ViT
learns nothing of the image in this budget (see `BACKBONE`). Its validation after
the last step scores the held-out studies with `voco.pretext.zero_shot` (AUC per finding and their mean, Recall@1/5
both ways; read back from MLflow), then the frozen-encoder probe of `pretraining_benefit.py` (`probe_encoder`: a
closed-form linear classifier on the frozen ViT's features of 8 labelled phantoms, Dice on 8 others, the volumes
mapped as in pretraining) scores the image encoder of the final checkpoint; "random init" is the same probe of an
untrained ViT. Seeds change the
initialisation, the masks, the data order, the held-out studies and the probe's voxel sample; the paired difference
compares a config with CLIP alone under the same seed. A difference counts as measurable where the paired t
statistic over the seeds passes the two-sided 5 % level (with 3 seeds: |t| >= 4.30, in practice every seed the same
sign and a tight spread).

Writes --results/mg3d_ablation.md and .json (`machine.write_report`: the command, the date, the machine record of every
run). Everything else lives under --out (phantoms, cache, run folders, MLflow in runs/mlflow.db); finished runs are
reused, so an interrupted ablation goes on where it stopped.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/mg3d_ablation.py            # 7 configs x 3 seeds
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/mg3d_ablation.py --quick    # clip and mg3d, seed 0, 8 steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from machine import SharedMachine, warning, write_report
from pretraining_benefit import mean_std, paired, probe_encoder

REPO = Path(__file__).resolve().parents[1]
MG3D_WEIGHTS = {"mlm_weight": 1.0, "sfr_weight": 0.1, "mim_weight": 1.0, "cml_weight": 0.1, "dfa_weight": 0.1,
                "ssm_weight": 0.1}
BASELINE = "clip"
CONFIGS = {BASELINE: ["cml_weight"], **{f"clip+{part}": ["cml_weight", f"{part}_weight"]
                                        for part in ("mlm", "sfr", "mim", "dfa", "ssm")}, "mg3d": list(MG3D_WEIGHTS)}
FINDINGS = ("kidney_lesion", "liver_lesion", "splenomegaly")  # voco.data.phantoms.STUDY_FINDINGS, sorted
# (key in a run's metrics, column heading); every value is shown x100: AUC and Recall in percent, Dice in points.
METRICS = ([("val/metric/zero_shot/mean_auc", "zero-shot AUC, mean")]
           + [(f"val/metric/zero_shot/{name}/auc", f"AUC {name.replace('_', ' ')}") for name in FINDINGS]
           + [(f"val/metric/retrieval/{way}_recall_at_{k}", f"{label} R@{k}")
              for way, label in (("report_to_study", "report→study"), ("study_to_report", "study→report"))
              for k in (1, 5)]
           + [("probe/dice", "probe Dice")])
SCAN_SIZE = [32, 32, 16]
# What the ViT sees (`input_standardise`, part of the backbone spec, so the probe and every checkpoint rebuild it):
# the preset's HU window [-175, 250] -> [0, 1], recentred on the window's middle (37.5 HU, soft tissue) and spread to
# [-4, 4] (1 unit = 53 HU): (x - 0.5) / 0.125. On [0, 1] as it comes (mean 0.28, sd 0.24, never below 0) the patch
# embedding's output is a fifth of the unit sin-cos position code and mostly the patch's mean brightness, and the
# from-scratch ViT learns nothing of the image in 1,000-3,000 steps, not even supervised by the findings; CML then
# sits at ln 8 (benchmarks/README.md, MG-3D section).
BACKBONE = {"name": "vit", "size": "tiny", "depth": 4, "in_channels": 1, "input_size": SCAN_SIZE,
            "patch_size": [8, 8, 4], "layout": "slice", "max_scans": 1, "use_checkpoint": False,
            "input_standardise": [0.5, 0.125]}
# Overrides of the bundle's train.json + smoke.json shared by every run (the loss weights, seed, steps and paths are
# added per run). lr 2e-4 rather than 5e-4: both learn with the input map, 2e-4 more evenly over seeds; at 5e-4 and
# above CLIP alone can collapse in the warm-up (every report embedding the same, CML at ln 8 for good).
SETTINGS = {"backbone": BACKBONE, "scan_size": SCAN_SIZE, "max_scans": 1, "scan_preset": "ct_resize",
            "batch_size": 8, "learning_rate": 2e-4, "validation_fraction": 0.2, "val_batches": 2, "cache": "disk",
            "num_workers": 0, "probe": False}
DEFAULTS = {"studies": 600, "steps": 1000, "seeds": [0, 1, 2], "configs": list(CONFIGS)}
QUICK = {"studies": 40, "steps": 8, "seeds": [0], "configs": [BASELINE, "mg3d"]}
T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # two-sided 5 %


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def loss_weights(config: str) -> dict[str, float]:
    """The six loss weights of a config: MG-3D's for the parts it names, 0 for the others."""
    return {name: (weight if name in CONFIGS[config] else 0.0) for name, weight in MG3D_WEIGHTS.items()}


def pretrain(config: str, seed: int, steps: int, studies: int, manifest: Path, out: Path) -> dict:
    """One bundle run (reused when its record exists) -> its record: metrics of the final validation, the
    final checkpoint, seconds and the machine meanwhile."""
    from voco.bundles import run_bundle
    from voco.tracking import read_run_metrics

    run_name = f"{config}-seed{seed}-{steps}steps-{studies}studies"
    record_file = out / "records" / f"{run_name}.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    tracking_uri = f"sqlite:///{out / 'runs' / 'mlflow.db'}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with SharedMachine() as machine:
        run_bundle("mg3d_pretrain", ["train.json", "smoke.json"], **SETTINGS, **loss_weights(config), seed=seed,
                   max_steps=steps, warmup_steps=max(steps // 10, 1), val_interval=steps, checkpoint_interval=steps,
                   log_interval=max(steps // 10, 1), manifest=str(manifest), cache_dir=str(out / "cache"),
                   run_name=run_name, output_dir=str(out / "runs" / run_name), tracking_uri=tracking_uri)
    seconds = time.perf_counter() - started
    runs = [run for run in read_run_metrics(tracking_uri, "mg3d_pretrain", run_name)
            if METRICS[0][0] in run["metrics"]]
    if not runs:
        raise SystemExit(f"the run {run_name} logged no zero-shot metrics; see {out / 'runs' / run_name}.")
    record = {"config": config, "seed": seed, "steps": steps, "seconds": seconds, "machine": machine.facts(),
              "metrics": runs[0]["metrics"],
              "checkpoint": str(out / "runs" / run_name / "checkpoints" / "checkpoint_final.pt")}
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1))
    print(f"{run_name}: {seconds:.0f} s, zero-shot mean AUC {record['metrics'][METRICS[0][0]]:.3f}", flush=True)
    return record


# --------------------------------------------------------------------------------------------------
# The table (pure functions of the numbers)
# --------------------------------------------------------------------------------------------------
def paired_t(differences: list[float]) -> float | None:
    """The paired t statistic ``mean / (sd / sqrt(n))`` of per-seed differences; None below two seeds; +-inf where
    every seed differs by the same non-zero amount."""
    if len(differences) < 2:
        return None
    mean, spread = statistics.mean(differences), statistics.stdev(differences)
    if spread <= 1e-6:  # the same difference every seed, up to float rounding (Recall moves in steps of 1/n)
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / (spread / math.sqrt(len(differences)))


def measurable(differences: list[float]) -> bool:
    """Whether per-seed differences pass the two-sided 5 % paired t-test (never with fewer than two seeds)."""
    t = paired_t(differences)
    return t is not None and abs(t) >= T_CRITICAL.get(len(differences) - 1, 2.0)


def differences_against_baseline(values: dict[str, dict[int, dict[str, float]]], baseline: str = BASELINE
                                 ) -> dict[str, dict[str, list[float]]]:
    """``{config: {seed: {metric: value}}}`` -> ``{config: {metric: [config - baseline per seed]}}`` over the seeds
    both have (the baseline itself left out)."""
    reference = values[baseline]
    return {config: {metric: [by_seed[seed][metric] - reference[seed][metric] for seed in sorted(by_seed)
                              if seed in reference and metric in by_seed[seed] and metric in reference[seed]]
                     for metric, _ in METRICS}
            for config, by_seed in values.items() if config != baseline}


def t_text(t: float) -> str:
    return "every seed the same" if math.isinf(t) else f"t = {t:.1f}"


def part_sentence(config: str, differences: dict[str, list[float]]) -> str:
    """One sentence of what the paired differences of a config against CLIP alone show."""
    labels = dict(METRICS)
    seeds = max((len(values) for values in differences.values()), default=0)
    if seeds < 2:
        return f"**{config}**: {seeds} seed, nothing judged (a measurable effect needs two seeds or more)."
    found = [f"{labels[metric]} {100 * statistics.mean(values):+.1f} ({t_text(paired_t(values))})"
             for metric, values in differences.items() if values and measurable(values)]
    if found:
        return f"**{config}**: a measurable effect on " + "; ".join(found) + ", no measurable effect on the rest."
    largest = max(((metric, statistics.mean(values)) for metric, values in differences.items() if values),
                  key=lambda item: abs(item[1]))
    return (f"**{config}**: no measurable effect on any metric (the largest mean difference, "
            f"{labels[largest[0]]} {100 * largest[1]:+.1f}, is within the spread over seeds).")


def markdown(report: dict) -> str:
    """The ablation's table: mean +- sd over seeds, the paired difference against CLIP alone per seed, a sentence
    per part."""
    values: dict[str, dict[int, dict[str, float]]] = {}
    for record in report["runs"]:
        values.setdefault(record["config"], {})[record["seed"]] = record["metrics"]
    configs = [config for config in CONFIGS if config in values]
    heading = "| config | " + " | ".join(label for _, label in METRICS) + " |"
    rule = "|---|" + "---|" * len(METRICS)
    lines = [f"Measured {report['date']} on {report['cpu_count']} CPU cores; command: `{report['command']}`.", "",
             f"{report['studies']} phantom studies ({SETTINGS['validation_fraction']:.0%} held out per seed), "
             f"{report['steps']} steps of {SETTINGS['batch_size']} studies, seeds "
             f"{', '.join(map(str, report['seeds']))}; {report['minutes']:.1f} min in all "
             f"({60 * report['minutes_per_run']:.0f} s per run on average). Every value x100: AUC and Recall in "
             "percent, Dice in points.", "", "## Mean ± sd over seeds", "", heading, rule]
    for config in configs:
        by_seed = values[config]
        cells = [mean_std([by_seed[seed][metric] for seed in sorted(by_seed) if metric in by_seed[seed]])
                 for metric, _ in METRICS]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    scratch = report.get("random_init", [])
    if scratch:
        lines.append("| random init | " + " | ".join(["-"] * (len(METRICS) - 1) + [mean_std(scratch)]) + " |")
    if BASELINE in values:
        differences = differences_against_baseline({config: values[config] for config in configs})
        lines += ["", f"## Paired difference against {BASELINE} alone (per seed)", "", heading, rule]
        for config in configs[1:]:
            lines.append(f"| {config} | " + " | ".join(
                paired([values[config][seed][metric] for seed in sorted(values[config])],
                       [values[BASELINE][seed][metric] for seed in sorted(values[config])])
                for metric, _ in METRICS) + " |")
        lines += ["", "## What the numbers show", "",
                  *[f"- {part_sentence(config, differences[config])}" for config in configs[1:]]]
    busiest = max(report["runs"], key=lambda record: record["machine"]["other_share"], default=None)
    if busiest is not None and warning(busiest["machine"]):
        lines += ["", f"Timing note: {warning(busiest['machine'])} during the busiest run (times are upper bounds)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help=f"default: all {len(CONFIGS)}")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default: {DEFAULTS['seeds']}")
    parser.add_argument("--steps", type=int, help=f"training steps of every run (default {DEFAULTS['steps']})")
    parser.add_argument("--studies", type=int, help=f"phantom studies (default {DEFAULTS['studies']})")
    parser.add_argument("--quick", action="store_true",
                        help="check the script end to end: clip and mg3d, seed 0, 8 steps, 40 studies; the table "
                             "goes to --out unless --results is given")
    parser.add_argument("--weight", nargs="+", default=[], metavar="PART_weight=VALUE",
                        help="another weight for a part wherever a config uses it, e.g. mlm_weight=0.1 (use a fresh "
                             "--out: finished runs are found by config and seed alone)")
    parser.add_argument("--out", default="runs/mg3d_ablation", help="folder of the phantoms, caches and runs")
    parser.add_argument("--results", help="folder of mg3d_ablation.md/.json (default benchmarks/results)")
    args = parser.parse_args()
    for setting in args.weight:
        name, _, value = setting.partition("=")
        if name not in MG3D_WEIGHTS or not value:
            parser.error(f"--weight {setting}: give PART_weight=VALUE with one of {', '.join(MG3D_WEIGHTS)}")
        MG3D_WEIGHTS[name] = float(value)
    chosen = {**DEFAULTS, **(QUICK if args.quick else {})}
    configs = args.configs or chosen["configs"]
    seeds, steps = args.seeds or chosen["seeds"], args.steps or chosen["steps"]
    studies = args.studies or chosen["studies"]
    if BASELINE not in configs:
        configs = [BASELINE, *configs]  # every difference is against CLIP alone
    out = Path(args.out).resolve()
    results = Path(args.results or (out if args.quick else REPO / "benchmarks" / "results")).resolve()
    os.chdir(REPO)

    from voco.data.phantoms import ensure_phantom_studies
    from voco.probe import default_probe_manifest, load_probe_set

    started = time.perf_counter()
    manifest = ensure_phantom_studies(out / f"phantom_studies{studies}", n=studies, seed=1, num_scans=1)
    probe_set = load_probe_set(default_probe_manifest(out / "probe_phantoms", n=16), SCAN_SIZE,
                               SETTINGS["scan_preset"])
    runs = []
    for seed in seeds:
        for config in configs:
            record = pretrain(config, seed, steps, studies, manifest, out)
            record["metrics"]["probe/dice"] = probe_encoder(BACKBONE, Path(record["checkpoint"]), probe_set,
                                                            seed)["probe/dice"]
            runs.append(record)
    random_init = [probe_encoder(BACKBONE, None, probe_set, seed)["probe/dice"] for seed in seeds]
    minutes = (time.perf_counter() - started) / 60
    report = {"date": time.strftime("%Y-%m-%d"), "cpu_count": len(os.sched_getaffinity(0)),
              "command": " ".join(["python", "benchmarks/mg3d_ablation.py", *sys.argv[1:]]), "studies": studies,
              "steps": steps, "seeds": seeds, "configs": configs, "settings": SETTINGS, "minutes": minutes,
              "minutes_per_run": sum(run["seconds"] for run in runs) / 60 / max(len(runs), 1),
              "loss_weights": {config: loss_weights(config) for config in configs}, "random_init": random_init,
              "runs": runs}
    results.mkdir(parents=True, exist_ok=True)
    write_report(results, "mg3d_ablation", report, markdown(report))


if __name__ == "__main__":
    main()

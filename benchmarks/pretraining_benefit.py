"""Does pretraining help? Every pretext against scratch, on the frozen probe and on label-efficient fine-tuning.

1. Pretrain each encoder with its bundle (`python -m monai.bundle run`, smoke settings scaled up) on unlabelled
   phantoms: VoCo and SimMIM on the tiny Swin; MAE, query box, contrastive and the cyclic mix on the tiny ViT (one
   ViT spec for all, the one the downstream UNETR takes: patch 16 on the task's 64 x 64 x 32 roi); SparK-style
   masked modelling, VoCo and contrastive on the tiny ResEnc (nnU-Net's residual-encoder CNN).
2. Frozen probe (`voco.probe`): each encoder's multi-scale features of labelled probe phantoms, a closed-form
   linear classifier, Dice on held-out phantoms. Scratch = the same backbone randomly initialised with the seed.
3. Fine-tune phantom-seg (SwinUNETR for Swin encoders, UNETR for ViT ones, nnU-Net's ResEnc U-Net for ResEnc ones) with 1, 2, ... labelled cases, the
   downstream bundle's CPU recipe (configs/small.json: lr, crops, sampling), scratch and pretrained with the same
   seed (same cases, same crop order). Validation Dice every `--eval_every` steps gives the learning curves and the
   convergence measure: the steps the pretrained model needs to reach scratch's best Dice, as a fraction of the
   steps scratch needed.
4. Write `benchmark.md` (mean +- std over seeds, the paired difference per seed), `benchmark.json` and
   `learning_curves.png` to `--results` (default benchmarks/results/).

Seeds vary the scratch initialisation, the probe's voxel sample, the fine-tuning cases and the crop order; each
encoder is pretrained once (seed 0). Everything lives under `--out` (MLflow in its runs/mlflow.db); pretraining
runs and fine-tuning cells already finished are reused, so an interrupted benchmark goes on where it stopped.

    .venv/bin/python benchmarks/pretraining_benefit.py                       # the 2-core CPU default
    .venv/bin/python benchmarks/pretraining_benefit.py --scale               # GPU-sized: more data, steps, cases
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SWIN = {"name": "swin", "size": "tiny", "in_channels": 1, "use_checkpoint": False, "window_size": 2}
VIT = {"name": "vit", "size": "tiny", "in_channels": 1, "input_size": [64, 64, 32], "patch_size": 16,
       "layout": "global", "use_checkpoint": False}
RESENC = {"name": "resenc", "size": "tiny", "in_channels": 1, "use_checkpoint": False}
BACKBONES = {"swin": SWIN, "vit": VIT, "resenc": RESENC}
REGION = [64, 64, 32]  # phantom-seg's roi: what the fine-tuned networks take
# pretext -> (bundle, backbone, overrides of the bundle's smoke settings, default pretraining steps). The step
# counts give each pretext a few minutes on the 2-core CPU: a VoCo step (batch 2, 4 base + 2 random crops) costs
# about 20 ViT steps.
PRETEXTS = {
    "voco": ("voco_pretrain", SWIN, {}, 240),  # the smoke layout: 2 x 2 base crops of 32 x 32 x 64
    "simmim_swin": ("mae_pretrain", SWIN, {"variant": "simmim", "region_size": REGION}, 600),
    "mae": ("mae_pretrain", VIT, {"region_size": REGION}, 1600),
    "query_box": ("querybox_pretrain", VIT, {"region_size": REGION}, 1600),
    "contrastive": ("multitask_pretrain", VIT, {"region_size": REGION, "task_names": ["contrastive"]}, 1600),
    "cyclic": ("multitask_pretrain", VIT, {"region_size": REGION}, 1600),
    # the mae bundle runs SparK-style masked modelling on a CNN; a CNN has no patch tokens for a masked third view
    "spark": ("mae_pretrain", RESENC, {"region_size": REGION}, 600),
    "voco_resenc": ("voco_pretrain", RESENC, {}, 240),
    "contrastive_resenc": ("multitask_pretrain", RESENC, {"region_size": REGION, "task_names": ["contrastive"],
                                                          "contrastive#num_views": 2}, 1600),
}


def pretrain(pretext: str, manifest: Path, steps: int, out: Path, tracking_uri: str) -> Path:
    """The pretext's final checkpoint, trained with its bundle unless a finished one is there."""
    from voco.checkpoints import find_latest_checkpoint

    bundle, backbone, overrides, _ = PRETEXTS[pretext]
    run_name = f"benefit-{pretext}-{steps}steps"
    checkpoints = out / "runs" / run_name / "checkpoints"
    final = checkpoints / "checkpoint_final.pt"
    if trained_steps(final) >= steps:
        return final
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               str([str(Path("bundles") / bundle / "configs" / name) for name in ("train.json", "smoke.json")]),
               "--bundle_root", str(Path("bundles") / bundle), "--manifest", str(manifest),
               "--backbone", json.dumps(backbone), "--run_name", run_name,
               "--output_dir", str(out / "runs" / run_name), "--cache_dir", str(out / "runs" / "cache"),
               "--max_steps", str(steps), "--warmup_steps", str(max(steps // 10, 1)),
               "--val_interval", str(max(steps // 4, 1)), "--log_interval", str(max(steps // 20, 1)),
               "--checkpoint_interval", str(max(steps // 2, 1)), "--tracking", "mlflow", "--tracking_uri",
               tracking_uri, "--probe_manifest", str(out / "probe_phantoms" / "manifest.json")]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    import subprocess

    started = time.perf_counter()
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    (out / f"pretrain_{pretext}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0 or trained_steps(final) < steps:
        latest = find_latest_checkpoint(checkpoints)
        raise SystemExit(f"pretraining {pretext} failed (exit {result.returncode}, latest checkpoint {latest}); "
                         f"see {out / f'pretrain_{pretext}.log'}.")
    print(f"pretrained {pretext}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return final


def trained_steps(checkpoint: Path) -> int:
    """The iteration a pretraining checkpoint was written at; 0 when there is none. A run that failed at its
    start also leaves a `checkpoint_final.pt` (written on the exception), so its existence proves nothing."""
    from voco.checkpoints import stored_step

    return (stored_step(checkpoint) or 0) if checkpoint.is_file() else 0


def probe_encoder(backbone_spec: dict, checkpoint: Path | None, probe_set, seed: int) -> dict[str, float]:
    """Probe Dice of a pretrained encoder (`checkpoint`) or, without one, of a random one seeded with `seed`."""
    import torch

    from voco.checkpoints import load_encoder_weights
    from voco.networks import build_backbone
    from voco.probe import probe_dice

    torch.manual_seed(seed)
    backbone = build_backbone(**backbone_spec)
    if checkpoint is not None:
        load_encoder_weights(backbone, checkpoint, min_loaded_fraction=0.99)
    return probe_dice(backbone, probe_set, seed=seed)


def finetune(task, dataset_dir: Path, backbone: str, checkpoint: Path | None, cases: int, seed: int,
             steps: int, eval_every: int, recipe: dict, mode: str = "finetune") -> list[tuple[int, float, float]]:
    """Fine-tune phantom-seg with the CPU recipe; returns [(step, large-organ Dice, mean Dice)] on validation.
    `mode` "frozen" trains the decoder alone on the frozen encoder (pretrained or, without a checkpoint, random)."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.optimizers import WarmupCosineSchedule
    from monai.utils import set_determinism

    from voco.benchmark.finetune import task_datalists
    from voco.benchmark.networks import build_task_network, encoder_of, initialize_from_pretrained, task_loss
    from voco.benchmark.phantom_tasks import class_groups
    from voco.benchmark.transforms import task_transforms

    set_determinism(seed)
    training, validation = task_datalists(task, str(dataset_dir), training_cases=cases, seed=seed)
    train_set = CacheDataset(training, task_transforms(task, train=True, num_samples=recipe["num_samples"],
                                                       crop_sampling=recipe["crop_sampling"]), progress=False)
    validation_set = CacheDataset(validation, task_transforms(task, train=False), progress=False)
    loader = DataLoader(train_set, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    network = build_task_network(task, backbone=backbone, size="tiny", window_size=recipe["window_size"])
    if checkpoint is not None:
        initialize_from_pretrained(network, str(checkpoint), mode=mode)
    elif mode == "frozen":
        encoder_of(network).requires_grad_(False)
    trained = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=recipe["learning_rate"],
                                  weight_decay=recipe["weight_decay"])
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=max(1, steps // 20), t_total=steps)
    loss_function = task_loss(task)
    large = [task.class_names.index(name) for name in class_groups(task.id)["large_organs"]]
    metric = DiceMetric(include_background=False, reduction="none")

    def evaluate() -> tuple[float, float]:
        network.eval()
        metric.reset()
        with torch.no_grad():
            for item in validation_set:
                scores = sliding_window_inference(item["image"][None], task.roi_size, 4, network, overlap=0.25)
                metric(one_hot(scores.argmax(1, keepdim=True), task.out_channels),
                       one_hot(item["label"][None].long(), task.out_channels))
        network.train()
        per_class = metric.aggregate().nanmean(0)
        return float(per_class[large].nanmean()), float(per_class.nanmean())

    curve, step = [], 0
    while step < steps:
        for batch in loader:
            loss = loss_function(network(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                curve.append((step, *evaluate()))
            if step >= steps:
                break
    return curve


def convergence_fraction(pretrained: list, scratch: list) -> float | None:
    """Steps the pretrained model needs to reach scratch's best large-organ Dice / steps scratch needed; None
    when it never does within the budget."""
    best = max(point[1] for point in scratch)
    scratch_steps = next(step for step, dice, _ in scratch if dice >= best)
    reached = [step for step, dice, _ in pretrained if dice >= best]
    return reached[0] / scratch_steps if reached else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def paired(values: list[float], baseline: list[float]) -> str:
    differences = [100 * (a - b) for a, b in zip(values, baseline)]
    return " / ".join(f"{d:+.1f}" for d in differences) if differences else "-"


def write_report(results: dict, args: argparse.Namespace, results_dir: Path) -> Path:
    """benchmark.md, benchmark.json and learning_curves.png."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "benchmark.json").write_text(json.dumps(results, indent=1))
    seeds = [str(seed) for seed in args.seeds]
    lines = ["# Pretraining benefit on phantom-seg (tiny encoders, CPU)", "",
             "Commands, run in this order on one `--out` folder (each reuses what the ones before finished):", "",
             *[f"    {command}" for command in results["commands"]], "",
             f"Wall time: {results['seconds'] / 60:.0f} min in all on this machine (2 CPU cores). Seeds {', '.join(seeds)}; Dice in points (×100); paired differences are pretrained − scratch per "
             f"seed.", "", "## Frozen probe (mean Dice over the 11 classes, held-out probe phantoms)", "",
             "| encoder | backbone | probe Dice | paired difference vs scratch |", "|---|---|---|---|"]
    probe = results["probe"]
    for name, row in probe.items():
        backbone = row["backbone"]
        baseline = probe[f"scratch_{backbone}"]["dice"]
        difference = "-" if name.startswith("scratch") else paired(row["dice"], baseline)
        lines.append(f"| {name} | {backbone} | {mean_std(row['dice'])} | {difference} |")
    lines += ["", "## Fine-tuning (large-organ Dice at the end: liver, spleen, kidneys, stomach; validation "
              "phantoms)", "", "Protocol `finetune` trains the whole network; `frozen` trains the decoder on the frozen "
              "encoder (pretrained, or random for scratch).", "",
              "| encoder | backbone | protocol | cases | final Dice | paired difference vs scratch | "
              "convergence fraction |", "|---|---|---|---|---|---|---|"]
    finetunes = results["finetune"]
    for key, row in finetunes.items():
        name, backbone, cases = row["encoder"], row["backbone"], row["cases"]
        finals = [curve[-1][1] for curve in row["curves"]]
        protocol = row.get("mode", "finetune")
        scratch = finetunes.get(f"scratch_{backbone}/{cases}" + ("" if protocol == "finetune" else f"/{protocol}"))
        if name.startswith("scratch") or scratch is None:
            difference, fraction = "-", "-"
        else:
            difference = paired(finals, [curve[-1][1] for curve in scratch["curves"]])
            fractions = [convergence_fraction(a, b) for a, b in zip(row["curves"], scratch["curves"])]
            fraction = " / ".join("never" if f is None else f"{f:.2f}" for f in fractions)
        lines.append(f"| {name} | {backbone} | {protocol} | {cases} | {mean_std(finals)} | {difference} | "
                     f"{fraction} |")
    (results_dir / "benchmark.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return results_dir / "benchmark.md"
    case_counts = sorted({row["cases"] for row in finetunes.values()})
    encoders = sorted({row["encoder"] for row in finetunes.values()})
    colours = {name: f"C{index}" for index, name in enumerate(encoders)}  # one colour per encoder in every panel
    figure, axes = plt.subplots(1, len(case_counts), figsize=(4.5 * len(case_counts), 3.6), squeeze=False)
    for axis, cases in zip(axes[0], case_counts):
        for row in finetunes.values():
            if row["cases"] != cases:
                continue
            steps = [point[0] for point in row["curves"][0]]
            dice = [statistics.mean(curve[i][1] for curve in row["curves"]) for i in range(len(steps))]
            protocol = row.get("mode", "finetune")
            axis.plot(steps, dice, label=row["encoder"] + ("" if protocol == "finetune" else f" ({protocol})"),
                      color=colours[row["encoder"]],
                      linestyle="--" if row["encoder"].startswith("scratch") else "-",
                      linewidth=1.0 if protocol == "frozen" else 1.8)
        axis.set(title=f"{cases} labelled case{'s' if cases > 1 else ''}", xlabel="fine-tuning step",
                 ylabel="large-organ Dice (mean over seeds)", ylim=(0, 1))
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(results_dir / "learning_curves.png", dpi=110)
    plt.close(figure)
    return results_dir / "benchmark.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretexts", nargs="+", default=list(PRETEXTS), choices=list(PRETEXTS))
    parser.add_argument("--pretrain_phantoms", type=int, default=24)
    parser.add_argument("--pretrain_steps", type=float, default=1.0,
                        help="a multiple of each pretext's default step count (voco and voco_resenc 240, "
                             "simmim_swin and spark 600, the ViT pretexts and contrastive_resenc 1600)")
    parser.add_argument("--probe_phantoms", type=int, default=16)
    parser.add_argument("--finetune", nargs="+", default=["voco", "query_box", "mae"],
                        help="pretexts that are also fine-tuned (with scratch of their backbone)")
    parser.add_argument("--cases", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--finetune_modes", nargs="+", default=["finetune"], choices=["finetune", "frozen"],
                        help="fine-tuning protocols: the whole network, and/or the decoder on the frozen encoder")
    parser.add_argument("--scale", action="store_true",
                        help="GPU-sized: 200 pretraining phantoms, 10x the pretraining steps, 1/2/4/8 cases, 600 "
                             "fine-tuning steps")
    parser.add_argument("--out", default="runs/pretraining_benefit")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    if args.scale:
        args.pretrain_phantoms, args.pretrain_steps, args.cases, args.finetune_steps = 200, 10.0, [1, 2, 4, 8], 600
    os.chdir(Path(__file__).resolve().parents[1])  # bundles/ and configs are found from the repository root

    from voco.benchmark import phantom_tasks
    from voco.benchmark.registry import get_task
    from voco.data.phantoms import ensure_phantoms
    from voco.probe import default_probe_manifest, load_probe_set

    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out}/runs/mlflow.db"
    (out / "runs").mkdir(exist_ok=True)
    same_body = dict(field_of_view_range=phantom_tasks.TASK_FIELD_OF_VIEW_RANGE,
                     in_plane_spacing_range=phantom_tasks.TASK_IN_PLANE_SPACING_RANGE,
                     slice_spacing_range=phantom_tasks.TASK_SLICE_SPACING_RANGE)
    manifest = ensure_phantoms(out / "pretrain_phantoms", n=args.pretrain_phantoms, seed=1000, with_labels=False,
                               **same_body)
    probe_manifest = default_probe_manifest(out / "probe_phantoms", n=args.probe_phantoms)
    task = get_task("phantom-seg")
    dataset_dir = phantom_tasks.prepare_phantom_task("phantom-seg", out / "phantom_seg", n=16, n_validation=8,
                                                     seed=2000)
    recipe = json.loads((Path("bundles") / "downstream_benchmark" / "configs" / "small.json").read_text())
    recipe.setdefault("crop_sampling", "classes")
    recipe.setdefault("weight_decay", 1e-5)

    steps = {pretext: max(int(PRETEXTS[pretext][3] * args.pretrain_steps), 1) for pretext in args.pretexts}
    checkpoints = {pretext: pretrain(pretext, manifest, steps[pretext], out, tracking_uri)
                   for pretext in args.pretexts}
    backbones = {name: spec for name, spec in BACKBONES.items() if any(PRETEXTS[p][1] is spec for p in args.pretexts)}

    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    command = "python benchmarks/pretraining_benefit.py " + " ".join(sys.argv[1:])
    results["commands"] = results.get("commands", []) + [command.strip()]  # every run that added to these results
    probe_set = load_probe_set(probe_manifest, REGION)
    results.setdefault("probe", {})  # rows of other pretexts measured before stay
    for name, checkpoint, backbone in ([(f"scratch_{b}", None, b) for b in backbones]
                                       + [(p, checkpoints[p], PRETEXTS[p][1]["name"]) for p in args.pretexts]):
        scores = [probe_encoder(BACKBONES[backbone], checkpoint, probe_set, seed) for seed in args.seeds]
        results["probe"][name] = {"backbone": backbone, "dice": [s["probe/dice"] for s in scores],
                                  "per_class": scores}
        print(f"probe {name}: {mean_std(results['probe'][name]['dice'])}", flush=True)

    finetunes = results.setdefault("finetune", {})
    encoders = [(f"scratch_{b}", None, b) for b in sorted({PRETEXTS[p][1]["name"] for p in args.finetune})]
    encoders += [(p, checkpoints[p], PRETEXTS[p][1]["name"]) for p in args.finetune if p in checkpoints]
    budget = {"steps": args.finetune_steps, "eval_every": args.eval_every}
    for mode in args.finetune_modes:
        for cases in args.cases:
            for name, checkpoint, backbone in encoders:
                key = f"{name}/{cases}" + ("" if mode == "finetune" else f"/{mode}")
                cell = {**budget, "pretrain_steps": steps.get(name), "pretrain_phantoms": args.pretrain_phantoms}
                if finetunes.get(key, {}).get("budget") != cell:
                    finetunes[key] = {"encoder": name, "backbone": backbone, "cases": cases, "mode": mode,
                                      "budget": cell, "by_seed": {}}
                by_seed = finetunes[key]["by_seed"]
                began = time.perf_counter()
                for seed in args.seeds:
                    if str(seed) in by_seed:
                        continue  # finished with the same settings: an interrupted benchmark goes on from here
                    by_seed[str(seed)] = finetune(task, dataset_dir, backbone, checkpoint, cases, seed,
                                                  args.finetune_steps, args.eval_every, recipe, mode)
                    results_file.write_text(json.dumps(results))
                finetunes[key]["curves"] = [by_seed[str(seed)] for seed in args.seeds]
                print(f"fine-tune {key}: {mean_std([c[-1][1] for c in finetunes[key]['curves']])} large-organ "
                      f"Dice ({time.perf_counter() - began:.0f} s)", flush=True)
    results["seconds"] = results.get("seconds", 0.0) + time.perf_counter() - started
    results_file.write_text(json.dumps(results))
    report = write_report(results, args, Path(args.results).resolve())
    print(report.read_text())
    print(f"finished in {(time.perf_counter() - started) / 60:.1f} min; report in {report}")


if __name__ == "__main__":
    main()

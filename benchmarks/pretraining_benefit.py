"""Does VoCo pretraining help? Phantom segmentation with few labels: pretrained encoder versus scratch.

1. VoCo-pretrain a tiny SwinUNETR encoder on unlabeled phantoms (bundles/voco_pretrain, smoke settings with
   more phantoms and steps);
2. export it;
3. fine-tune the phantom-seg task (bundles/downstream_benchmark, smoke settings) from scratch and from the
   encoder with the same budget (epochs, training cases), over several seeds, through `voco benchmark run`;
4. print the table of `voco benchmark report` (mean ± std of the best validation Dice per encoder).

Runs in the current folder (runs/ holds everything, MLflow in runs/mlflow.db). On two CPU cores the defaults
take roughly half an hour:

    .venv/bin/python benchmarks/pretraining_benefit.py --pretrain_steps 300 --epochs 30 --training_cases 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_phantoms", type=int, default=48)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--training_cases", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/pretraining_benefit")
    args = parser.parse_args()

    from voco.benchmark.report import collect_results, format_markdown, summarize, write_report
    from voco.benchmark.runs import plan_grid, run_grid
    from voco.bundles import run_bundle
    from voco.checkpoints import export_encoder
    from voco.data.phantoms import ensure_phantoms
    from voco.engine import latest_checkpoint
    from voco.tracking import default_tracking_uri

    start = time.perf_counter()
    out = Path(args.out).resolve()
    tracking_uri = default_tracking_uri()
    manifest = ensure_phantoms(out / "pretraining_phantoms", n=args.pretrain_phantoms, seed=1000)
    run_name = f"benefit-voco-tiny-{args.pretrain_steps}steps"
    checkpoint = latest_checkpoint(Path("runs") / run_name / "checkpoints")
    if checkpoint is None or "final" not in Path(checkpoint).name:
        run_bundle("voco_pretrain", ["train.json", "smoke.json"], manifest=str(manifest), run_name=run_name,
                   max_steps=args.pretrain_steps, val_interval=max(args.pretrain_steps // 3, 1),
                   log_interval=25, checkpoint_interval=max(args.pretrain_steps // 3, 1), tracking="mlflow",
                   tracking_uri=tracking_uri)
        checkpoint = latest_checkpoint(Path("runs") / run_name / "checkpoints")
    encoder, _ = export_encoder(checkpoint, out / "voco_tiny_encoder.pt")
    print(f"pretrained encoder: {encoder} ({time.perf_counter() - start:.0f} s)")

    from voco.benchmark.phantom_tasks import prepare_phantom_task

    dataset_dir = prepare_phantom_task("phantom-seg", out / "phantom_seg", n=16, n_validation=8, seed=2000,
                                       shape_range=[[48, 64], [48, 64], [32, 40]])
    cells = plan_grid(["phantom-seg"], ["scratch", str(encoder)], seeds=args.seeds.split(","), size="tiny",
                      training_cases=args.training_cases)
    run_grid(cells, dataset_dirs={"phantom-seg": str(dataset_dir)}, tracking_uri=tracking_uri, config_files=("train.json", "smoke.json"),
             overrides={"max_epochs": args.epochs, "val_interval": max(args.epochs // 6, 1)})
    summary = summarize(collect_results(tracking_uri, tasks=["phantom-seg"]))
    summary = [row for row in summary if row.get("training_cases") in (args.training_cases, str(args.training_cases))]
    write_report(summary, out)
    print(format_markdown(summary))
    print(f"finished in {time.perf_counter() - start:.0f} s; report in {out}")


if __name__ == "__main__":
    main()

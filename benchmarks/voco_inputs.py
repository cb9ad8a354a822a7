"""CPU milliseconds per volume to make VoCo's model inputs (crops + position labels), V2 layout.

Ours: `voco.pretext.voco.make_crops` on a batch of regions: one gather cuts, flips and rotates all
9 base + 2 random crops of every region, then one intensity shift (what the pretext does on the device).
Reference-like: for each crop of each volume, a MONAI chain as in the reference loader
(SpatialCropd -> RandFlipd x 3 -> RandRotate90d -> RandShiftIntensityd, composed with Compose and built
per volume, since the random centres change), the labels computed in Python, then the crops stacked
into a batch as the DataLoader's collate would.

The floor is plain torch slicing of the same 11 crops, flipped as drawn, copied into one batch tensor.

With ``--pretexts``, the other pretexts' model inputs too (MAE/SimMIM masks and targets, query boxes, contrastive
views; built from each bundle's train.json at its region size), batch 1 to 16, against a memory-traffic floor:
a copy of every tensor they produce (each input byte written once, read once from a source of the same size).
Query boxes and contrastive views resample their crops (trilinear), which costs more than a copy by nature.

    .venv/bin/python benchmarks/voco_inputs.py --threads 1 --batches 1 2 4 8 16 --repeats 15
    .venv/bin/python benchmarks/voco_inputs.py --threads 1 --batches 1 2 4 8 16 --repeats 9 --pretexts
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch


def reference_position_labels(centre_x: int, centre_y: int, crop: int, base: int, grid: int) -> np.ndarray:
    """The reference's label loop for one random crop -> [grid * grid]."""
    half = crop // 2
    x_min, x_max, y_min, y_max = centre_x - half, centre_x + half, centre_y - half, centre_y + half
    labels = []
    for i in range(grid):
        for j in range(grid):
            dx = min((i + 1) * base, x_max) - max(i * base, x_min)
            dy = min((j + 1) * base, y_max) - max(j * base, y_min)
            labels.append(0.0 if dx <= 0 or dy <= 0 else dx * dy / (crop * crop))
    return np.asarray(labels)


def reference_inputs(regions: list, rng: np.random.Generator, grid: int = 3, crop: int = 64,
                     random_crops: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop MONAI transform chains, as the reference's loader runs them, for a list of volumes."""
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandShiftIntensityd, SpatialCropd

    def chain(centre: list[int]) -> Compose:
        return Compose([
            SpatialCropd(keys=["image"], roi_center=centre, roi_size=[crop, crop, crop]),
            RandFlipd(keys=["image"], prob=0.2, spatial_axis=0),
            RandFlipd(keys=["image"], prob=0.2, spatial_axis=1),
            RandFlipd(keys=["image"], prob=0.2, spatial_axis=2),
            RandRotate90d(keys=["image"], prob=0.2, max_k=3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ])

    all_crops, all_labels = [], []
    for region in regions:
        extent = region["image"].shape[1]
        base_chains = [chain([int((i + 0.5) * crop), int((j + 0.5) * crop), crop // 2])
                       for i in range(grid) for j in range(grid)]
        random_chains, labels = [], []
        for _ in range(random_crops):
            centre_x, centre_y = (int(v) for v in rng.integers(crop // 2, extent - crop // 2, size=2))
            random_chains.append(chain([centre_x, centre_y, crop // 2]))
            labels.append(reference_position_labels(centre_x, centre_y, crop, crop, grid))
        crops = [t(region)["image"] for t in base_chains + random_chains]
        all_crops.append(torch.stack([torch.as_tensor(c) for c in crops]))
        all_labels.append(torch.as_tensor(np.stack(labels)))
    return torch.stack(all_crops), torch.stack(all_labels)


def median_ms(functions: list, repeats: int) -> list[float]:
    """Median wall milliseconds of each function; calls are interleaved so that a busy machine slows all alike."""
    times: list[list[float]] = [[] for _ in functions]
    for function in functions:
        function()  # warm-up
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append((time.perf_counter() - start) * 1000)
    return [statistics.median(samples) for samples in times]


def floor_inputs(regions: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out: torch.Tensor) -> None:
    """The floor: plain torch slicing of the same crops, each flipped as drawn and copied into one batch tensor
    (the least memory traffic any implementation needs: read each crop once, write it once)."""
    for b, n in itertools.product(range(boxes.shape[0]), range(boxes.shape[1])):
        x0, y0, z0, x1, y1, z1 = boxes[b, n].tolist()
        crop = regions[b, :, x0:x1, y0:y1, z0:z1]
        dims = [1 + axis for axis in range(3) if flips[b, n, axis]]
        out[b, n].copy_(crop.flip(dims) if dims else crop)


def measure(batch: int, repeats: int, device: str) -> dict[str, float]:
    """ms per volume of ours, the floor and the per-crop MONAI chains at one batch size, interleaved."""
    from monai.data import MetaTensor

    from voco.geometry import VOCO_V2_LAYOUT
    from voco.geometry import sample_random_boxes
    from voco.pretext.voco import make_crops, reference_augmentation, sample_augmentation

    layout = VOCO_V2_LAYOUT
    augmentation = reference_augmentation(layout)
    regions = torch.rand(batch, 1, *layout.region_size, generator=torch.Generator().manual_seed(0))
    device_regions = regions.to(device)
    generator = torch.Generator().manual_seed(0)

    def ours() -> None:
        views = make_crops(device_regions, layout, 2, "reference", augmentation, generator)
        if device_regions.is_cuda:
            torch.cuda.synchronize()
        assert views.crops.shape == (batch, 11, 1, 64, 64, 64)

    boxes = torch.cat([layout.base_boxes().expand(batch, -1, -1),
                       sample_random_boxes(layout, 2, batch, "reference", torch.Generator().manual_seed(1))], dim=1)
    flips = sample_augmentation(augmentation, batch, 11, torch.Generator().manual_seed(2))[0]
    out = torch.empty(batch, 11, 1, 64, 64, 64)

    def floor() -> None:
        floor_inputs(regions, boxes, flips, out)

    volumes = [{"image": MetaTensor(region)} for region in regions]
    rng = np.random.default_rng(0)

    def reference() -> None:
        crops, labels = reference_inputs(volumes, rng)
        assert crops.shape == (batch, 11, 1, 64, 64, 64) and labels.shape == (batch, 2, 9)

    ours_ms, floor_ms, reference_ms = (ms / batch for ms in median_ms([ours, floor, reference], repeats))
    return {"batch": batch, "ours": ours_ms, "floor": floor_ms, "reference": reference_ms}


def produced_tensors(value) -> list[torch.Tensor]:
    """Every tensor in what an input maker returns (tensors, tuples, dicts, dataclasses / named tuples)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, name) for name in value.__dataclass_fields__]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in produced_tensors(item)]
    return []


def measure_pretexts(batches: list[int], repeats: int) -> None:
    """Each pretext's input maker (as `pretraining.py` finds it) against the copy of what it produces."""
    from pretraining import bundle_config, input_makers

    print("\nOther pretexts' inputs (each bundle's train.json region), ms per volume; floor: a copy of every tensor "
          "they produce")
    print("| inputs | region | batch | ours | floor (copy of the outputs) | ours / floor |")
    print("|---|---|---:|---:|---:|---:|")
    for bundle in ("mae", "query_box", "multitask"):
        recipe = bundle_config(bundle, "B", {"device": "$torch.device('cpu')"})
        region = tuple(recipe.get_parsed_content("region_size"))
        makers = input_makers(recipe.get_parsed_content("pretext"))
        for name, maker in makers.items():
            if bundle == "multitask" and name in ("mae", "query_box"):
                continue  # measured with their own bundle
            for batch in batches:
                regions = torch.rand(batch, 1, *region, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    produced = produced_tensors(maker(regions))
                    ours, floor = median_ms([lambda: maker(regions),
                                             lambda: [tensor.clone() for tensor in produced]], repeats)
                print(f"| {name} ({bundle}) | {'x'.join(map(str, region))} | {batch} | {ours / batch:.2f} | "
                      f"{floor / batch:.2f} | {ours / floor:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="volumes per batch")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="device of our path (the reference path is CPU only)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="leave glibc's defaults (every batch-sized tensor on fresh pages) instead of what a "
                             "training process does (voco.allocation.keep_freed_memory)")
    parser.add_argument("--pretexts", action="store_true", help="also the MAE, query-box and contrastive inputs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.fresh_pages:
        from voco.allocation import keep_freed_memory

        keep_freed_memory()
    print(f"VoCo V2 inputs (region 192x192x64, 9 base + 2 random crops of 64^3), {args.threads} thread(s), median "
          f"of {args.repeats}, ms per volume; ours on {args.device}, floor and per-crop MONAI chains on the CPU")
    print("| batch | ours | floor (plain slicing + flips) | per-crop MONAI | ours / floor | MONAI / ours |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        row = measure(batch, args.repeats, args.device)
        print(f"| {batch} | {row['ours']:.2f} | {row['floor']:.2f} | {row['reference']:.2f} | "
              f"{row['ours'] / row['floor']:.2f} | {row['reference'] / row['ours']:.1f}x |", flush=True)
    if args.pretexts:
        measure_pretexts(args.batches, args.repeats)


if __name__ == "__main__":
    main()

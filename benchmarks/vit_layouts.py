"""ViT forward + backward: tokens per second and attention memory of the `global` and `window` layouts.

Both layouts run the same ViT (same weights, same input) side by side in one process, interleaved repeat by
repeat so that machine noise hits both alike; the result is the ratio. Attention memory is the size of the
attention-score tensors one block materialises without a fused kernel (batch x heads x sum over groups of
T^2 x 4 bytes, the memory flash attention avoids); on a GPU the measured peak memory of the step is reported too.

    .venv/bin/python benchmarks/vit_layouts.py --size B --input 96 --patch 16 --window 3 --batch 2
    .venv/bin/python benchmarks/vit_layouts.py --size B --input 192 192 96 --patch 16 --window 3 --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from voco.networks import build_backbone


def attention_score_bytes(encoder, batch: int, grid: tuple[int, int, int]) -> dict[str, int]:
    """Bytes of fp32 attention scores per block kind for one input batch."""
    heads = encoder.blocks[0].attn.num_heads
    tokens = grid[0] * grid[1] * grid[2]
    window = encoder.window_size[0] * encoder.window_size[1] * encoder.window_size[2]
    return {"global": batch * heads * tokens * tokens * 4,
            "window": batch * heads * (tokens // window) * window * window * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="B")
    parser.add_argument("--input", type=int, nargs="+", default=[96], help="input size: one side or three")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--window", type=int, default=3, help="window side in tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    size = tuple(arguments.input) * 3 if len(arguments.input) == 1 else tuple(arguments.input)
    encoders = {layout: build_backbone("vit", arguments.size, input_size=size, patch_size=arguments.patch,
                                       layout=layout, window_size=arguments.window).to(device)
                for layout in ("global", "window")}
    encoders["window"].load_state_dict(encoders["global"].state_dict())  # a layout adds no parameters
    images = torch.randn(arguments.batch, 1, *size, device=device)
    grid = encoders["global"].token_grid(size)
    tokens = arguments.batch * grid[0] * grid[1] * grid[2]

    def step(encoder) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=arguments.precision == "bf16"):
            loss = encoder(images).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for encoder in encoders.values():  # warm-up
        step(encoder)
    seconds: dict[str, list[float]] = {layout: [] for layout in encoders}
    peak: dict[str, int] = {}
    for _ in range(arguments.repeats):
        for layout, encoder in encoders.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[layout].append(step(encoder))
            if device.type == "cuda":
                peak[layout] = max(peak.get(layout, 0), torch.cuda.max_memory_allocated())
    scores = attention_score_bytes(encoders["window"], arguments.batch, grid)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "vit": arguments.size, "input": size, "patch": arguments.patch, "window_tokens": arguments.window,
        "batch": arguments.batch, "tokens_per_step": tokens, "precision": arguments.precision,
        "blocks": {layout: encoders[layout].groupings.count("window") for layout in encoders},
        "tokens_per_s": {layout: tokens / statistics.median(values) for layout, values in seconds.items()},
        "attention_scores_mib_per_block": {layout: scores[layout] / 2 ** 20 for layout in scores},
    }
    results["speed_ratio_window_over_global"] = results["tokens_per_s"]["window"] / results["tokens_per_s"]["global"]
    results["attention_memory_ratio_global_over_window"] = scores["global"] / scores["window"]
    if peak:
        results["peak_memory_mib"] = {layout: value / 2 ** 20 for layout, value in peak.items()}
    print(f"ViT-{arguments.size}, input {size}, patch {arguments.patch}, window {arguments.window}^3 tokens, "
          f"batch {arguments.batch}, {results['device']}, {arguments.precision}")
    print("| layout | window blocks | tokens/s (fwd+bwd) | attention scores per global/window block |")
    print("|---|---|---|---|")
    for layout in encoders:
        print(f"| {layout} | {results['blocks'][layout]} | {results['tokens_per_s'][layout]:.0f} | "
              f"{results['attention_scores_mib_per_block'][layout]:.2f} MiB |")
    print(f"window / global speed: {results['speed_ratio_window_over_global']:.2f}x; attention score memory of a "
          f"window block: 1/{results['attention_memory_ratio_global_over_window']:.0f} of a global block")
    if peak:
        print("peak device memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in results["peak_memory_mib"].items()))
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

"""Resampling with a slab's rows spread over the threads vs one grid_sample batch (the CPU kernel for 3-D
grids runs its threads over the batch only).

    python scripts/benchmarks/sampling.py [--rounds 3] [--threads N]

One process: the synthetic CT of ``predict.py``'s benchmark (512x512x120 at 0.8x0.8x2.5 mm). Workloads:
preprocessing it to SAT's 1x1x3 mm grid (``preprocess_image``: resampling, crop, normalisation) and mapping
one label's probabilities from the cropped grid back to the input grid on every voxel
(``invert_to_original``). Each workload runs with ``lorkd.data.grid``'s sampling as it is ("spread") and
with a one-batch grid_sample per slab ("one batch", what it did before), taking turns within each round;
the table shows the median seconds and whether the outputs are identical.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data import grid  # noqa: E402
from lorkd.data.transforms import PreprocessConfig, invert_to_original, preprocess_image  # noqa: E402
from scripts.benchmarks.predict import ct_volume  # noqa: E402
from scripts.benchmarks.rounds import parse_round_args  # noqa: E402


def one_batch(src: torch.Tensor, sample_grid: torch.Tensor, mode: str, out: torch.Tensor) -> None:
    """The sampling before: the slab's rows as one batch entry (the kernel then runs one thread)."""
    out[:] = F.grid_sample(src, sample_grid[None], mode=mode, padding_mode="border", align_corners=False)[0]


def main() -> None:
    args = parse_round_args(__doc__)
    volume, affine = ct_volume()
    config = PreprocessConfig(spacing=(1.0, 1.0, 3.0))
    _, info = preprocess_image(volume, "ct", config, affine=affine)
    probability = np.random.default_rng(0).random((1, *info.shape), dtype=np.float32)
    workloads = {
        "preprocessing (CT to 1x1x3 mm)": lambda: preprocess_image(volume, "ct", config, affine=affine)[0],
        "inversion (one label, every voxel)": lambda: invert_to_original(probability, info),
    }
    samplers = {"one batch": one_batch, "spread": grid._grid_sample_rows}
    print(f"# {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n")
    print("| workload | one batch (s) | spread over threads (s) | spread / one batch | identical |")
    print("|---|---|---|---|---|")
    for name, work in workloads.items():
        seconds: dict[str, list[float]] = {s: [] for s in samplers}
        outputs: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for sampler_name, sampler in samplers.items():
                grid._grid_sample_rows = sampler
                start = time.perf_counter()
                outputs[sampler_name] = np.asarray(work())
                seconds[sampler_name].append(time.perf_counter() - start)
        grid._grid_sample_rows = samplers["spread"]
        before, after = (statistics.median(seconds[s]) for s in samplers)
        same = np.array_equal(outputs["one batch"], outputs["spread"])
        print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.2f}x | {same} |")


if __name__ == "__main__":
    main()

"""Mapping one label back to the input grid: ``invert_to_original`` with and without sampling only where the crop reaches.

    python scripts/benchmarks/inversion.py [--labels 1] [--rounds 3] [--threads N]

One process: the synthetic CT of ``predict.py``'s benchmark (512x512x120 at 0.8x0.8x2.5 mm) preprocessed
to SAT's 1x1x3 mm grid with its foreground crop, random probabilities on the cropped grid, then
:func:`lorkd.data.transforms.invert_to_original` with ``resample(..., support=crop)`` (the default) and
with every output voxel sampled (``support`` ignored). The two take turns within each round; the
table shows the median seconds and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data import grid, transforms  # noqa: E402
from lorkd.data.transforms import PreprocessConfig, invert_to_original, preprocess_image  # noqa: E402
from scripts.benchmarks.predict import ct_volume  # noqa: E402


def every_voxel(*args, support=None):
    """``grid.resample`` without the crop's support: every output voxel sampled."""
    return grid.resample(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1, help="channels mapped back in one call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    volume, affine = ct_volume()
    _, info = preprocess_image(volume, "ct", PreprocessConfig(spacing=(1.0, 1.0, 3.0)), affine=affine)
    probabilities = np.random.default_rng(0).random((args.labels, *info.shape), dtype=np.float32)
    variants = {"support (default)": grid.resample, "every voxel": every_voxel}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, resample in variants.items():
            transforms.resample = resample
            start = time.perf_counter()
            outputs[name] = invert_to_original(probabilities, info)
            seconds[name].append(time.perf_counter() - start)
    transforms.resample = grid.resample
    same = np.array_equal(outputs["support (default)"], outputs["every voxel"])
    base = statistics.median(seconds["every voxel"])
    print(f"# {args.labels} label(s), preprocessed {info.shape} in {info.resampled_shape}, back to {info.original_shape}; "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| inversion | s | vs every voxel | identical |")
    print("|---|---|---|---|")
    for name in variants:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.2f} | {median / base:.2f}x | {same} |")


if __name__ == "__main__":
    main()

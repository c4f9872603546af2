"""Mapping labels back to the input grid: every voxel, the crop's support box, or only where a label can pass the threshold.

    python scripts/benchmarks/inversion.py [--labels 1] [--group 8] [--rounds 3] [--threads N]

One process: the synthetic CT of ``predict.py``'s benchmark (512x512x120 at 0.8x0.8x2.5 mm) preprocessed
to SAT's 1x1x3 mm grid with its foreground crop. Each label's probability map on the cropped grid is 0.9 on
the CT's liver (its ellipse on slices 20-99) and random values in [0, 0.2) elsewhere, i.e. a trained
model's output in shape, not in values. Per label, the time of mapping it back and adding it to the
masks and the multilabel map (``Predictor.predict``'s ``_Assembler``):

  every voxel     ``invert_to_original`` sampling every output voxel, the whole grid added;
  crop box        ``invert_to_original`` with ``resample(..., support=crop)`` (what ``predict`` does when
                  it keeps probabilities), the whole grid added;
  threshold box   ``invert_above`` (``group_above`` + ``invert_group``): only the box where a label can pass the threshold is
                  sampled and added, slab by slab, labels whose boxes overlap enough sampled together (at
                  most ``--group`` labels; what ``predict`` does otherwise).

The rows take turns within each round; the table shows the median seconds per label and whether the masks
and the multilabel map equal the first row's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data import grid, transforms  # noqa: E402
from lorkd.data.transforms import (  # noqa: E402
    InversionInfo,
    PreprocessConfig,
    invert_above,
    invert_to_original,
    preprocess_image,
    to_preprocessed_grid,
)
from lorkd.inference.predictor import _Assembler  # noqa: E402
from scripts.benchmarks.predict import ct_volume  # noqa: E402
from scripts.benchmarks.rounds import parse_round_args  # noqa: E402

THRESHOLD = 0.5


def every_voxel(*args, support=None):
    """``grid.resample`` without the crop's support: every output voxel sampled."""
    return grid.resample(*args)


def organ_maps(volume: np.ndarray, affine: np.ndarray, info: InversionInfo, n: int) -> np.ndarray:
    """(n, *info.shape) float32: 0.9 on the CT's liver, random [0, 0.2) elsewhere."""
    x, y = np.meshgrid((np.arange(512) - 255.5) * 0.8, (np.arange(512) - 255.5) * 0.8, indexing="ij")
    liver = np.zeros(volume.shape, dtype=np.float32)
    liver[..., 20:100] = (((x - 60) / 70) ** 2 + ((y + 10) / 55) ** 2 < 1)[..., None]
    inside = to_preprocessed_grid(liver[None], info)[0] > 0.5
    rng = np.random.default_rng(0)
    maps = rng.random((n, *info.shape), dtype=np.float32) * 0.2
    maps[:, inside] = 0.9
    return maps


def assemble(reference: nib.Nifti1Image, maps: np.ndarray, invert: Callable) -> _Assembler:
    outputs = _Assembler(reference, [f"label {i}" for i in range(len(maps))], THRESHOLD, False)
    invert(outputs, maps)
    return outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=int, default=1, help="labels mapped back per round")
    parser.add_argument("--group", type=int, default=8, help="labels sampled together at most (predict: 8 on a CT)")


def main() -> None:
    args = parse_round_args(__doc__, add_arguments)
    volume, affine = ct_volume()
    _, info = preprocess_image(volume, "ct", PreprocessConfig(spacing=(1.0, 1.0, 3.0)), affine=affine)
    maps = organ_maps(volume, affine, info, args.labels)
    reference = nib.Nifti1Image(np.broadcast_to(np.uint8(0), volume.shape), affine)

    def whole(outputs: _Assembler, maps: np.ndarray) -> None:
        for index, probability in enumerate(maps):
            outputs.add(index, invert_to_original(probability[None], info)[0])

    def boxed(outputs: _Assembler, maps: np.ndarray) -> None:
        for indices, box, values in invert_above(maps, info, THRESHOLD, args.group):
            for index, probability in zip(indices, values):
                outputs.add(index, probability, box)

    rows = {"every voxel": (every_voxel, whole), "crop box": (grid.resample, whole), "threshold box": (grid.resample, boxed)}
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    results: dict[str, _Assembler] = {}
    for _ in range(args.rounds):
        for name, (resample, invert) in rows.items():
            transforms.resample = resample
            start = time.perf_counter()
            results[name] = assemble(reference, maps, invert)
            seconds[name].append((time.perf_counter() - start) / args.labels)
    transforms.resample = grid.resample
    first = results["every voxel"]
    base = statistics.median(seconds["every voxel"])
    print(f"# {args.labels} label(s), preprocessed {info.shape} in {info.resampled_shape}, back to {info.original_shape}; "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| mapping back + assembling | s per label | vs every voxel | masks and map identical |")
    print("|---|---|---|---|")
    for name, outputs in results.items():
        same = np.array_equal(outputs.segmentation, first.segmentation) and all(
            np.array_equal(np.asarray(outputs.mask(k).dataobj), np.asarray(first.mask(k).dataobj)) for k in first.masks
        )
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.2f} | {median / base:.2f}x | {same} |")


if __name__ == "__main__":
    main()

"""Mask voxels outside the head on the real MNI152 T1, with and without the Predictor's two guards (CPU).

    python scripts/benchmarks/specks.py CHECKPOINT [--labels "grey matter" "white matter"] [--edge-padding 8]

Predicts the whole MNI152 2009a T1 at 2 mm (nilearn) twice, with ``edge_padding`` 0 (SAT's windows,
the foreground crop's faces on window borders) and ``--edge-padding``, both without the body mask,
then applies the body mask (``Predictor.body``) to each: four settings from two network runs, each
mapped back to the T1's grid as ``predict.py`` does. Per label: mask voxels, voxels where the T1 is 0
more than ``--body-margin`` voxels from the head (and how many of them lie within 1 voxel of the
crop box's faces), and Dice against the template's tissue map (probability > 0.5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data.demo import mni_arrays  # noqa: E402
from lorkd.data.transforms import invert_to_original  # noqa: E402
from lorkd.evaluation.metrics import voxels_outside  # noqa: E402
from lorkd.inference import Predictor  # noqa: E402

TISSUE_IDS = {"grey matter": 1, "white matter": 2}


def face_shell(shape: tuple[int, ...], width: int = 1) -> np.ndarray:
    """(1, *shape) float mask of the voxels within ``width`` voxels of the array's faces."""
    shell = np.ones(shape, np.float32)
    shell[tuple(slice(width, s - width) for s in shape)] = 0.0
    return shell[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--labels", nargs="+", default=list(TISSUE_IDS))
    parser.add_argument("--edge-padding", type=int, default=8)
    parser.add_argument("--body-margin", type=int, default=2, help="voxels around the head not counted as outside")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arrays = mni_arrays()
    if arrays is None:
        sys.exit("nilearn is not installed: no MNI152 T1")
    t1, tissues, affine = arrays
    head = t1 > 0
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", body_mask=False)
    _, image, info = predictor.preprocess_input(t1, "mri", affine=affine)
    body = predictor.body(image, info)
    faces = invert_to_original(face_shell(info.shape), info, mode="nearest")[0] > 0.5

    print(
        f"{args.checkpoint}: MNI152 T1 {'x'.join(map(str, t1.shape))} at 2 mm -> preprocessed "
        f"{'x'.join(map(str, info.shape))} (crop {info.crop_start}-{info.crop_end}), window {predictor.window}, "
        f"background {info.background:.3f} (0 = the scan's mean), body margin {predictor.body_margin_mm:g} mm; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    lines = [
        "| edge_padding | body_mask | label | mask voxels | outside the head | of which on the crop faces "
        "| Dice vs template |",
        "|---|---|---|---|---|---|---|",
    ]
    seconds = {}
    for pad in dict.fromkeys((0, args.edge_padding)):
        predictor.edge_padding = pad
        start = time.perf_counter()
        probs = predictor.predict_preprocessed(image, args.labels, "mri", info=info)
        seconds[pad] = time.perf_counter() - start
        for guard in (False, True):
            masked = probs * body if guard else probs
            original = invert_to_original(masked, info, mode="bilinear") > predictor.threshold
            for label, mask in zip(args.labels, original):
                ref = tissues == TISSUE_IDS.get(label, -1)
                dice = 2 * np.count_nonzero(mask & ref) / max(np.count_nonzero(mask) + np.count_nonzero(ref), 1)
                lines.append(
                    f"| {pad} | {str(guard).lower()} | {label} | {int(mask.sum()):,} | "
                    f"{voxels_outside(mask, head, args.body_margin):,} | "
                    f"{voxels_outside(mask & faces, head, args.body_margin):,} | {dice:.4f} |"
                )
        print(f"edge_padding={pad}: {seconds[pad]:.1f} s", flush=True)
    lines += [
        "",
        "| edge_padding | network seconds | ratio to 0 |",
        "|---|---|---|",
        *(f"| {pad} | {s:.1f} | {s / seconds[0]:.2f} |" for pad, s in seconds.items()),
    ]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

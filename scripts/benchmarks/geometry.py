"""Our grid resampling and sliding window (``lorkd.data.grid``, ``lorkd.inference.sliding_window``) vs MONAI's.

    python scripts/benchmarks/geometry.py [--size 512 512 120] [--sw-size 256 256 96] [--window 64 64 32]
        [--overlap 0.5] [--sw-batch 2] [--rounds 1] [--threads N]

Each measurement runs in a fresh (spawned) process that builds the same inputs, then times one call under
:class:`PeakMemory` (sampled RSS above the level at entry), so neither implementation inherits the other's
freed memory; ours and MONAI's alternate per operation. Resampling: the synthetic CT of ``predict.py``'s benchmark (``--size`` voxels
at 0.8x0.8x2.5 mm, LPS-free diagonal affine) to SAT's RAS 1x1x3 mm grid and back, nearest and bilinear
(MONAI: ``SpatialResample(padding_mode="border")``). Sliding window: a random (1, 1, ``--sw-size``) image
through a small random conv net (1 -> 4 channels, sigmoid), gaussian blending (MONAI:
``sliding_window_inference(mode="gaussian", sigma_scale=0.125)``). Seconds are the best of ``--rounds``;
"max |diff|" compares the two outputs. The first row is the import the prediction path no longer pays:
a fresh interpreter (numpy, torch, nibabel already loaded) importing our two modules vs MONAI's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data import grid  # noqa: E402
from lorkd.inference.sliding_window import count_windows, sliding_window_probabilities  # noqa: E402
from scripts.benchmarks.predict import PeakMemory, ct_volume, monai_resample  # noqa: E402


def monai_sliding_window(image, model, window, overlap, batch):
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(
        image, tuple(window), batch, model, overlap, mode="gaussian", sigma_scale=0.125,
        padding_mode="constant", cval=0.0, sw_device="cpu", device="cpu",
    )[0]


def measure(rounds: int, fn: Callable, *args: object) -> tuple[object, float, float]:
    """Result, best seconds and largest peak MiB of ``rounds`` calls ``fn(*args)`` (in inference mode, as
    the Predictor)."""
    best, peak, result = float("inf"), 0.0, None
    for _ in range(rounds):
        result = None
        with PeakMemory(torch.device("cpu")) as memory:
            start = time.perf_counter()
            with torch.inference_mode():
                result = fn(*args)
            best = min(best, time.perf_counter() - start)
        peak = max(peak, memory.peak_mb)
    return result, best, peak


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def task(op: str, implementation: str, args: argparse.Namespace) -> tuple[np.ndarray, float, float]:
    """One measurement in a fresh process: build the inputs, then time ``implementation`` ("ours" or
    "monai") on ``op`` ("nearest"/"bilinear" forward or "<mode> back" resampling, or "sliding window")."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import monai  # noqa: F401  (both implementations start from the same imports)

    ours = implementation == "ours"
    if op == "sliding window":
        torch.manual_seed(0)
        net = torch.nn.Conv3d(1, 4, 3, padding=1).eval()

        def model(windows: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(net(windows))

        image = torch.randn(1, 1, *args.sw_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model(torch.zeros(args.sw_batch, 1, *args.window))  # warm-up: the first conv call is not timed
        blend = sliding_window_probabilities if ours else monai_sliding_window
        out, seconds, peak = measure(args.rounds, blend, image, model, args.window, args.overlap, args.sw_batch)
        return np.asarray(out), seconds, peak
    volume, affine = ct_volume()
    image = np.round(volume[: args.size[0], : args.size[1], : args.size[2]])[None]  # int16-like HU values
    dst_affine, dst_shape = grid.target_grid(image.shape[1:], affine, "RAS", (1.0, 1.0, 3.0))
    mode = op.split()[0]
    call = (image, affine, dst_affine, dst_shape, mode)
    if op.endswith("back"):  # the forward result (identical for both) back to the input grid
        call = (grid.resample(*call), dst_affine, affine, image.shape[1:], mode)
    del volume
    out, seconds, peak = measure(args.rounds, grid.resample if ours else monai_resample, *call)
    return np.asarray(out), seconds, peak


IMPORTS = {  # what the prediction path imports for grids, resampling and blending
    "ours": "import lorkd.data.grid, lorkd.inference.sliding_window",
    "monai": "import monai.data, monai.transforms, monai.inferers",
}
IMPORT_PROBE = """
import sys, time
import numpy, torch, nibabel
start = time.perf_counter()
exec(sys.argv[1])
print(time.perf_counter() - start)
"""


def import_seconds(statement: str, rounds: int) -> float:
    """Best seconds of ``statement`` in a fresh interpreter that has already imported numpy, torch, nibabel."""
    runs = []
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE, statement], capture_output=True, text=True, check=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        runs.append(float(done.stdout.split()[-1]))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 120])
    parser.add_argument("--sw-size", type=int, nargs=3, default=[256, 256, 96])
    parser.add_argument("--window", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    volume, affine = ct_volume()
    size = volume[: args.size[0], : args.size[1], : args.size[2]].shape
    dst_shape = grid.target_grid(size, affine, "RAS", (1.0, 1.0, 3.0))[1]
    del volume
    shapes = f"{'x'.join(map(str, size))} -> {'x'.join(map(str, dst_shape))}"
    windows = count_windows(args.sw_size, args.window, args.overlap)
    names = {
        "nearest": f"resample nearest, {shapes}",
        "nearest back": "resample nearest, back",
        "bilinear": f"resample bilinear, {shapes}",
        "bilinear back": "resample bilinear, back",
        "sliding window": f"sliding window {'x'.join(map(str, args.sw_size))}, window "
        f"{'x'.join(map(str, args.window))}, {windows} windows",
    }
    t_o, t_m = (import_seconds(IMPORTS[k], args.rounds) for k in ("ours", "monai"))
    rows: list[tuple] = [("import (a fresh interpreter with torch: our modules vs MONAI's)", t_o, t_m, None, None, None)]
    context = multiprocessing.get_context("spawn")
    for op, name in names.items():
        results = {}
        for implementation in ("ours", "monai"):
            with ProcessPoolExecutor(1, mp_context=context) as pool:  # a fresh process per measurement
                results[implementation] = pool.submit(task, op, implementation, args).result()
        (a, t_o, m_o), (b, t_m, m_m) = results["ours"], results["monai"]
        rows.append((name, t_o, t_m, m_o, m_m, max_diff(a, b)))
        del results, a, b

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, best of {args.rounds}\n")
    print("| operation | ours (s) | MONAI (s) | time vs MONAI | ours peak (MiB) | MONAI peak (MiB) | memory vs MONAI | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t_o, t_m, m_o, m_m, diff in rows:
        memory = "- | - | -" if m_m is None else f"{m_o:.0f} | {m_m:.0f} | " + (f"{m_o / m_m:.2f}x" if m_m > 0 else "-")
        difference = "-" if diff is None else f"{diff:.1e}"
        print(f"| {name} | {t_o:.2f} | {t_m:.2f} | {t_o / t_m:.2f}x | {memory} | {difference} |")


if __name__ == "__main__":
    main()

"""ONNX expert (onnxruntime) vs the same merged expert in torch: one CT-sized case, sliding windows on the CPU.

One plain SAT (a deployed expert: what ``lorkd-export`` writes; random weights) is exported with
``lorkd.checkpoints.onnx.export_onnx`` for one window; then the same preprocessed volume is predicted
with the Predictor's sliding-window path (``WindowModel`` + MONAI blending, gaussian, same queries),
once with the torch network and once with the onnxruntime session, each after one warm-up window
batch. Prints a markdown table with seconds, the ratio onnxruntime / torch and max |Δ| probability.

python scripts/benchmarks/onnx_runtime.py [--preset demo|nano] [--size 256 256 96] [--window 64 64 32] [--labels 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lorkd.checkpoints.onnx import OnnxExpert, export_onnx
from lorkd.inference.sliding_window import WindowModel, count_windows, sliding_window_probabilities
from lorkd.models.sat import SAT
from scripts.benchmarks.export import PRESETS, sat_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=["demo", "nano"])
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 96], help="preprocessed volume (1x1x3 mm grid)")
    parser.add_argument("--window", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    net = SAT(**sat_args(preset["student"], preset["heads"])).eval()
    params = sum(p.numel() for p in net.parameters())
    image = torch.randn(1, 1, *args.size)
    queries = torch.randn(args.labels, net.query_dim)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(net, args.window, Path(tmp) / "model.onnx")
        export_seconds = time.perf_counter() - start
        runtimes = {"torch": net, "onnxruntime": OnnxExpert(path, args.window, threads=torch.get_num_threads())}
        seconds, outputs = {}, {}
        for name, model in runtimes.items():
            window_model = WindowModel(model, queries, None, max_queries=16)
            with torch.inference_mode():
                window_model(torch.randn(args.sw_batch_size, 1, *args.window))  # warm-up
                start = time.perf_counter()
                outputs[name] = sliding_window_probabilities(image, window_model, args.window, args.overlap, args.sw_batch_size)
                seconds[name] = time.perf_counter() - start
    diff = float((outputs["torch"] - outputs["onnxruntime"]).abs().max())
    windows = count_windows(args.size, args.window, args.overlap)
    size, window = "×".join(map(str, args.size)), "×".join(map(str, args.window))
    print(f"## ONNX expert vs torch, CPU, {torch.get_num_threads()} threads, {preset['name']} student ({params:,} parameters)\n")
    print(f"volume {size}, window {window}, overlap {args.overlap}, {windows} windows, {args.labels} labels; "
          f"ONNX export took {export_seconds:.1f} s\n")  # fmt: skip
    print("| runtime | s/case | vs torch | max abs diff |")
    print("|---|---|---|---|")
    for name in runtimes:
        print(f"| {name} | {seconds[name]:.1f} | {seconds[name] / seconds['torch']:.2f}x | {0.0 if name == 'torch' else diff:.1e} |")


if __name__ == "__main__":
    main()

"""CPU runtimes of one merged expert: torch eager, onnxruntime, OpenVINO f32 and (where native) bf16, in one run.

One plain SAT (a deployed expert: what ``lorkd-export`` writes; random weights) per preset runs window
batches of the given window and batch with the same queries:
  torch        ``WindowModel`` (what the Predictor runs with ``runtime=torch``)
  onnxruntime  ``lorkd.checkpoints.onnx.export_onnx`` + ``OnnxExpert`` (``runtime=onnx``)
  openvino     ``lorkd.inference.openvino_runtime`` (``runtime=openvino``/``auto``), f32, and bf16 when the
               CPU reports native bf16 (``precision=bf16``)
Each runtime gets one warm-up call, then ``--repeats`` timed calls (median); the order of the runtimes
turns round from repeat to repeat. Prints the CPU (name, bf16/AMX/VNNI flags), a markdown table of
seconds per window batch, the ratio to torch and the max |Δp| against torch, and the one-time costs
(ONNX export, OpenVINO conversion and compilation).

python scripts/benchmarks/cpu_runtimes.py [--case demo:48,48,16:2 nano:288,288,96:1 ...] [--labels 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lorkd.checkpoints.onnx import OnnxExpert, export_onnx
from lorkd.inference import openvino_runtime
from lorkd.inference.sliding_window import WindowModel
from lorkd.models.sat import SAT
from scripts.benchmarks.export import PRESETS, sat_args

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_line() -> str:
    """The CPU's model name, the flags that matter for these runtimes and the threads used."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    name, flags = info.get("model name") or platform.processor() or "unknown CPU", set(info.get("flags", "").split())
    shown = [f for f in FLAGS if f in flags]
    return f"{name}; flags: {' '.join(shown) or 'none of ' + ' '.join(FLAGS)}; {torch.get_num_threads()} threads"


def parse_case(text: str) -> tuple[str, tuple[int, ...], int]:
    preset, window, batch = text.split(":")
    return preset, tuple(int(w) for w in window.split(",")), int(batch)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(
    preset: str, window: tuple[int, ...], batch: int, labels: int, repeats: int, tmp: Path, skip: Sequence[str] = ()
) -> list[str]:
    torch.manual_seed(0)
    spec = PRESETS[preset]
    net = SAT(**sat_args(spec["student"], spec["heads"])).eval()
    params = sum(p.numel() for p in net.parameters())
    windows = torch.randn(batch, 1, *window)
    queries = torch.randn(labels, net.query_dim)
    runtimes: dict[str, Callable[[], torch.Tensor]] = {}
    one_time: list[str] = []

    torch_model = WindowModel(net, queries, None, max_queries=labels)
    runtimes["torch eager"] = lambda: torch_model(windows)
    if "onnxruntime" not in skip:
        seconds, path = timed(lambda: export_onnx(net, window, tmp / f"{preset}.onnx"))
        one_time.append(f"ONNX export {seconds:.1f} s")
        session = OnnxExpert(path, window, threads=torch.get_num_threads())
        runtimes["onnxruntime"] = lambda: session.probabilities(windows, queries)
    precisions = ["f32"]
    if openvino_runtime.available():
        if "BF16" in openvino_runtime.cpu_description()["capabilities"]:
            precisions.append("bf16")
        for precision in precisions:
            start = time.perf_counter()
            expert = openvino_runtime.openvino_expert(
                net, None, window, {}, preset, torch.get_num_threads(), precision, tmp / "cache"
            )
            one_time.append(f"OpenVINO {precision} conversion (first) + compilation {time.perf_counter() - start:.1f} s")
            runtimes[f"OpenVINO {precision}"] = lambda e=expert: e.probabilities(windows, queries)
    names = list(runtimes)
    seconds_of: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in names:
            _, outputs[name] = timed(runtimes[name])  # warm-up
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds_of[name].append(timed(runtimes[name])[0])
    base = statistics.median(seconds_of["torch eager"])
    rows = []
    label = f"{preset} student ({params / 1e6:.1f} M), {'×'.join(map(str, window))}, batch {batch}"
    for name in names:
        median = statistics.median(seconds_of[name])
        diff = float((outputs[name] - outputs["torch eager"]).abs().max())
        ratio = "1" if name == "torch eager" else f"{median / base:.2f}×"
        rows.append(f"| {label} | {name} | {median:.3f} | {ratio} | {diff:.1e} |")
    rows.append(f"|  | one-time: {'; '.join(one_time)} | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=["demo:48,48,16:2", "nano:96,96,64:1", "nano:288,288,96:1"],
                        help="preset:window:batch (presets of scripts/benchmarks/export.py)")  # fmt: skip
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["onnxruntime"],
                        help="runtimes left out (the ONNX export traces two windows: 13+ GB at 288x288x96)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every runtime (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()}\n")
    print(f"{args.labels} labels, {args.repeats} timed repeats after one warm-up (median)\n")
    print("| expert, window, batch | runtime | s/window batch | vs torch | max abs Δp vs torch |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.case:
            for row in run_case(*parse_case(case), args.labels, args.repeats, Path(tmp), args.skip):
                print(row, flush=True)


if __name__ == "__main__":
    main()

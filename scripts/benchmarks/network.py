"""CPU options for the network itself: one window batch through the Predictor's ``WindowModel``.

    python scripts/benchmarks/network.py [--presets tiny nano] [--window 64 64 32] [--labels 5]
        [--rounds 5] [--compile] [--threads N]
    python scripts/benchmarks/network.py --batch-sweep 64x64x32 128x128x32 ... [--presets ...]

One process, the random-weight students of ``predict.py``'s presets routed to one expert (as prediction
runs them), the same random windows for every variant. Variants take turns within each round (the
median over rounds is shown, so a drift in machine load does not favour one):
  baseline        inference mode, sw_batch_size 2 (the Predictor's CPU default), float32, contiguous
  no_grad         torch.no_grad instead of inference mode
  batch 1 / 4     1 or 4 windows per forward (ms per window compare)
  channels-last   model and windows in ``torch.channels_last_3d``
  bf16 autocast   CPU autocast to bfloat16 (max |Δ probability| against the baseline shown)
  compiled        ``torch.compile`` of the network (with ``--compile``; its compile time is printed)

``--batch-sweep``: for each window size, one window per forward against two (the Predictor's
``sw_batch_size`` default on the CPU follows this table): milliseconds per window, peak memory of a
forward (sampled RSS above its start) and the largest probability difference between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.inference.sliding_window import WindowModel, default_sw_batch_size  # noqa: E402
from lorkd.regions import RegionMap  # noqa: E402
from scripts.benchmarks.predict import PeakMemory, build_model  # noqa: E402


def variants(net: torch.nn.Module, queries: torch.Tensor, expert: int, compile_net: bool) -> dict[str, tuple[Callable, int, str]]:
    """name -> (run(windows) -> probabilities, windows per call, grad mode)."""
    plain = WindowModel(net, queries, expert)
    out: dict[str, tuple[Callable, int, str]] = {
        "baseline (inference mode, batch 2)": (plain, 2, "inference"),
        "no_grad": (plain, 2, "no_grad"),
        "batch 1": (plain, 1, "inference"),
        "batch 4": (plain, 4, "inference"),
    }

    def channels_last(windows: torch.Tensor) -> torch.Tensor:
        net.to(memory_format=torch.channels_last_3d)
        try:
            return plain(windows.contiguous(memory_format=torch.channels_last_3d))
        finally:
            net.to(memory_format=torch.contiguous_format)

    def bf16(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(windows).float()

    out["channels-last-3d"] = (channels_last, 2, "inference")
    out["bf16 autocast"] = (bf16, 2, "inference")
    if compile_net:  # WindowModel calls encode and decode, not forward: compile those two
        twin = copy.copy(net)  # shares the modules and weights
        twin.encode, twin.decode = torch.compile(net.encode), torch.compile(net.decode)
        out["torch.compile"] = (WindowModel(twin, queries, expert), 2, "inference")
    return out


def grad_mode(name: str) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if name == "inference" else torch.no_grad()


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def batch_sweep(preset: str, windows: list[tuple[int, int, int]], labels: list[str], expert: int, rounds: int, regions: RegionMap) -> None:
    """One against two windows per forward, per window size (turns alternate; medians over rounds)."""
    cpu = torch.device("cpu")
    for window in windows:
        loaded = build_model(preset, window, regions, labels)
        with torch.inference_mode():
            model = WindowModel(loaded.net.eval(), loaded.prompts.queries(labels, "ct"), expert)
            torch.manual_seed(1)
            windows_in = torch.randn(2, 1, *window)
            probs = {b: model(windows_in[:b]) for b in (2, 1)}  # warm-up, and the outputs compared
            diff = float((probs[2][:1] - probs[1]).abs().max())
            del probs
            seconds: dict[int, list[float]] = {1: [], 2: []}
            peaks = {1: 0.0, 2: 0.0}
            for r in range(rounds):
                for batch in (1, 2) if r % 2 else (2, 1):
                    release_freed_memory()  # else the other batch's freed pages hide this one's peak
                    with PeakMemory(cpu) as memory:
                        start = time.perf_counter()
                        model(windows_in[:batch])
                        seconds[batch].append((time.perf_counter() - start) / batch)
                    peaks[batch] = max(peaks[batch], memory.peak_mb)
        one, two = (statistics.median(seconds[b]) for b in (1, 2))
        print(
            f"| {preset} | {'x'.join(map(str, window))} | {math.prod(window):,} | {1000 * two:.0f} | {1000 * one:.0f} "
            f"| {one / two:.2f}x | {peaks[2]:.0f} | {peaks[1]:.0f} | {peaks[1] / max(peaks[2], 1e-9):.2f}x "
            f"| {diff:.1e} | {default_sw_batch_size(cpu, window)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "nano"])
    parser.add_argument("--window", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--labels", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-sweep", nargs="+", default=None, metavar="XxYxZ", help="window sizes, e.g. 64x64x32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    regions = RegionMap.from_config("demo")
    labels = sorted(k.split("_", 1)[1] for k, r in regions.label_region.items() if r == "abdomen")[: args.labels]
    expert = regions.regions.index("abdomen")
    if args.batch_sweep:
        windows = [tuple(int(v) for v in w.split("x")) for w in args.batch_sweep]
        print(f"# {len(labels)} prompts, {args.rounds} rounds (median), {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| preset | window | voxels | ms / window, 2 per forward | ms / window, 1 per forward | 1 vs 2 time "
              "| peak MB, 2 | peak MB, 1 | 1 vs 2 memory | max abs diff of probabilities | Predictor default |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for preset in args.presets:
            batch_sweep(preset, windows, labels, expert, args.rounds, regions)  # type: ignore[arg-type]
        return
    print(f"# window {tuple(args.window)}, {len(labels)} prompts, {args.rounds} rounds (median), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print("| preset | variant | ms / window | vs baseline | max abs diff of probabilities |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        loaded = build_model(preset, args.window, regions, labels)
        net = loaded.net.eval()
        with torch.inference_mode():
            queries = loaded.prompts.queries(labels, "ct")
        torch.manual_seed(1)
        windows = torch.randn(4, 1, *args.window)
        runs = variants(net, queries, expert, args.compile)
        reference = None
        times: dict[str, list[float]] = {name: [] for name in runs}
        diffs: dict[str, float] = {}
        for name, (run, batch, mode) in runs.items():  # warm-up (and compilation) outside the timings
            start = time.perf_counter()
            with grad_mode(mode):
                probs = run(windows[:batch])
            if name.startswith("torch.compile"):
                print(f"# {preset}: torch.compile warm-up {time.perf_counter() - start:.1f} s", flush=True)
            reference = probs[:1] if reference is None else reference
            diffs[name] = float((probs[:1] - reference).abs().max())
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                run, batch, mode = runs[name]
                start = time.perf_counter()
                with grad_mode(mode):
                    run(windows[:batch])
                times[name].append((time.perf_counter() - start) / batch)
        base = statistics.median(times[next(iter(runs))])
        for name in runs:
            ms = statistics.median(times[name])
            print(f"| {preset} | {name} | {1000 * ms:.0f} | {ms / base:.2f}x | {diffs[name]:.1e} |", flush=True)


if __name__ == "__main__":
    main()

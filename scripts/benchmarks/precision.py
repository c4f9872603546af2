"""What reduced precision costs: per-label Dice of OpenVINO bf16 and int8 masks against full-precision masks, and the speed-up.

The same checkpoint predicts every case of a test manifest, one runtime after the other per case: torch
(f32, the reference), OpenVINO f32 (``runtime=openvino``), OpenVINO bf16 (``precision=bf16``, only on
CPUs with native bf16) and, with ``--calibration``, OpenVINO int8 (``precision=int8``, NNCF calibrated
on that manifest's cases). Prints, per dataset and label, the Dice of each OpenVINO runtime's masks with
the torch masks (mean and minimum over the cases; both masks empty counts as 1), the voxels that
changed and the voxels in the torch masks, then seconds per case and the ratio to torch (networks
converted and quantised beforehand: a one-time cost).

python scripts/benchmarks/precision.py --ckpt outputs/demo/lorkd/checkpoints/last.ckpt [--manifest outputs/demo/data/test.jsonl]
    [--calibration outputs/demo/data/train.jsonl] [--cases N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lorkd.inference import openvino_runtime
from lorkd.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, default=ROOT / "outputs" / "demo" / "data" / "test.jsonl")
    parser.add_argument("--calibration", type=Path, default=None, help="int8 calibration manifest (default: no int8)")
    parser.add_argument("--cases", type=int, default=None, help="first N cases (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()][: args.cases]
    precisions = ["f32"] + (["bf16"] if "BF16" in openvino_runtime.cpu_description()["capabilities"] else [])
    with tempfile.TemporaryDirectory() as cache:
        predictors = {"torch f32": Predictor.from_checkpoint(args.ckpt, device="cpu")}
        for precision in precisions:
            predictors[f"OpenVINO {precision}"] = Predictor.from_checkpoint(
                args.ckpt, device="cpu", runtime="openvino", precision=precision, cache_dir=cache
            )
        if args.calibration is not None:
            predictors["OpenVINO int8"] = Predictor.from_checkpoint(
                args.ckpt, device="cpu", runtime="openvino", precision="int8", cache_dir=cache, calibration=args.calibration
            )
        for case in cases:  # converted and compiled before any timing
            for predictor in predictors.values():
                predictor.check(case["label"], case["modality"])
        seconds: dict[str, list[float]] = defaultdict(list)
        scores: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        changed: dict[tuple[str, str, str], int] = defaultdict(int)
        voxels: dict[tuple[str, str], int] = defaultdict(int)
        for case in cases:
            image = args.manifest.parent / case["image"]
            masks = {}
            for name, predictor in predictors.items():
                start = time.perf_counter()
                result = predictor.predict(image, case["label"], case["modality"])
                seconds[name].append(time.perf_counter() - start)
                masks[name] = {label: np.asarray(result.masks[label].dataobj, bool) for label in case["label"]}
            dataset = case.get("dataset", "")
            for label in case["label"]:
                voxels[dataset, label] += int(masks["torch f32"][label].sum())
            for name in list(predictors)[1:]:
                for label in case["label"]:
                    reference, other = masks["torch f32"][label], masks[name][label]
                    scores[name, dataset, label].append(dice(reference, other))
                    changed[name, dataset, label] += int(np.count_nonzero(reference != other))
    print(f"{args.ckpt}, {len(cases)} cases of {args.manifest}; CPU: {openvino_runtime.cpu_description()['name']}\n")
    print("| runtime | dataset | label | cases | Dice vs torch f32, mean | min | voxels changed | of voxels in torch's masks |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, dataset, label), values in sorted(scores.items()):
        print(f"| {name} | {dataset} | {label} | {len(values)} | {np.mean(values):.4f} | {min(values):.4f} "
              f"| {changed[name, dataset, label]} | {voxels[dataset, label]} |")
    print("\n| runtime | s/case | vs torch f32 |")
    print("|---|---|---|")
    base = float(np.mean(seconds["torch f32"]))
    for name, values in seconds.items():
        print(f"| {name} | {np.mean(values):.2f} | {np.mean(values) / base:.2f}× |")


if __name__ == "__main__":
    main()

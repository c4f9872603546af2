"""Evaluation throughput: cases per minute on a test manifest, and where the time goes (network vs NSD).

    python scripts/benchmarks/eval_throughput.py --ckpt CKPT [--manifest outputs/demo/data/test.jsonl]
        [--model experts|teacher] [--space original|preprocessed] [--threads N]

One process, the evaluation's own per-case function (:func:`lorkd.evaluation.scoring.evaluate_case`, what
``eval.py`` runs for each case) with the default metric settings, after one warm-up case. Stages are
timed by wrapping the functions it calls: the Predictor's prediction (of which the network: every window
batch through :class:`WindowModel`), reading the reference masks, the confusion counts behind Dice, and
the surface distances behind NSD. Shares are of the summed per-case seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lorkd.evaluation.metrics as metrics_module  # noqa: E402
import lorkd.evaluation.scoring as scoring_module  # noqa: E402
from lorkd.data.manifest import ManifestError, read_manifest  # noqa: E402
from lorkd.evaluation.scoring import evaluate_case  # noqa: E402
from lorkd.evaluation.settings import MetricSettings  # noqa: E402
from lorkd.inference.predictor import Predictor  # noqa: E402
from lorkd.inference.sliding_window import WindowModel  # noqa: E402
from scripts.benchmarks.stages import StageTimer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--manifest", type=Path, default=ROOT / "outputs" / "demo" / "data" / "test.jsonl")
    parser.add_argument("--network", default="experts", choices=["experts", "teacher"])
    parser.add_argument("--space", default="original", choices=["original", "preprocessed"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases, problems = read_manifest(args.manifest, require_masks=True)  # as eval.py reads it: with the masks
    if problems:
        raise ManifestError(args.manifest, problems)
    predictor = Predictor.from_checkpoint(args.ckpt, network=args.network, device="cpu")
    settings = MetricSettings(space=args.space)
    evaluate_case(predictor, cases[0], settings, predictor.model.region_map)  # warm-up, outside the timings

    timer = StageTimer()
    Predictor.predict = timer.wrap("prediction", Predictor.predict)
    Predictor.predict_preprocessed = timer.wrap("prediction", Predictor.predict_preprocessed)
    WindowModel.__call__ = timer.wrap("network", WindowModel.__call__)
    scoring_module.load_masks = timer.wrap("reference masks", scoring_module.load_masks)
    metrics_module.confusion_counts = timer.wrap("Dice (confusion counts)", metrics_module.confusion_counts)
    metrics_module._surface_dice = timer.wrap("NSD (surface distances)", metrics_module._surface_dice)
    start = time.perf_counter()
    labels = 0
    for case in cases:
        labels += len(evaluate_case(predictor, case, settings, predictor.model.region_map))
    total = time.perf_counter() - start

    s = timer.seconds
    print(f"# {args.manifest} ({len(cases)} cases, {labels} label rows), {args.ckpt} network={args.network}, "
          f"space={args.space}, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print(f"\n{len(cases) / total * 60:.1f} cases/min ({total:.1f} s for {len(cases)} cases)\n")
    print("| stage | seconds | share of the evaluation |")
    print("|---|---|---|")
    rows = [
        ("prediction (all of Predictor.predict)", s["prediction"]),
        ("  of which the network", s["network"]),
        ("  of which the rest (reading, preprocessing, stitching, inversion)", s["prediction"] - s["network"]),
        ("reference masks", s["reference masks"]),
        ("Dice (confusion counts)", s["Dice (confusion counts)"]),
        ("NSD (surface distances)", s["NSD (surface distances)"]),
        ("other (rows, bookkeeping)", total - s["prediction"] - s["reference masks"]
         - s["Dice (confusion counts)"] - s["NSD (surface distances)"]),
    ]  # fmt: skip
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()

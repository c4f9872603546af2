"""Real anatomy: train on one half of real scans, report Dice on the held-out other half (CPU, minutes).

    python scripts/benchmarks/real_anatomy.py [--out outputs/real_anatomy] [--steps 600] [train.py overrides ...]

1. ``lorkd.data.real_anatomy.build_real_halves``: LiTS-117 CT (liver, liver tumour) and the MNI152 T1
   at 2 mm (grey/white matter), each cut into a posterior half (train) and an anterior half (test);
2. ``train.py experiment=real_anatomy``: a small SAT from scratch on the two posterior halves
   (skipped when finished, resumed from ``last.ckpt`` when interrupted);
3. ``eval.py`` on the anterior halves: Dice and NSD per label in each file's own grid;
4. prediction on the whole MNI152 T1 (2 mm): mask voxels lying where the image is background
   (intensity 0) more than ``--body-margin`` voxels from the head, with SAT's behaviour (no edge
   padding, no body mask: the crop margin alone; ``specks.py`` measures the Predictor's guards).

Writes ``<out>/results.md`` (the tables printed at the end). Needs ``liver-ct-segmentation-package``
(``pip install --no-deps``) and/or ``nilearn``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.data.demo import mni_arrays  # noqa: E402
from lorkd.data.real_anatomy import build_real_halves  # noqa: E402
from lorkd.evaluation.metrics import voxels_outside  # noqa: E402
from scripts.demo import finished_step, run, train_stage  # noqa: E402

TISSUES = ("grey matter", "white matter")


def held_out_table(eval_dir: Path) -> str:
    """Per (case, label) Dice and NSD of the held-out halves, from ``per_case.csv``."""
    with open(eval_dir / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["| held-out case | label | Dice | NSD | reference voxels |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['case']} | {r['label']} | {float(r['dice']):.4f} | {float(r['nsd']):.4f} | {int(r['n_ref']):,} |"
        for r in rows
    ]
    return "\n".join(lines)


def specks_table(checkpoint: Path, body_margin: int) -> str:
    """Predict grey/white matter on the whole MNI152 T1 (2 mm) and count mask voxels outside the head,
    with the checkpoint's foreground-crop margin and with SAT's tight crop (margin 0) at inference,
    without the Predictor's guards (``edge_padding=0, body_mask=False``)."""
    from lorkd.inference import Predictor

    arrays = mni_arrays()
    if arrays is None:
        return "nilearn not installed: no MNI152 prediction"
    t1, _, affine = arrays
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", edge_padding=0, body_mask=False)
    trained = predictor.preprocess.crop_margin_mm
    lines = [
        f"Whole MNI152 T1 at 2 mm ({'x'.join(map(str, t1.shape))}; the model was trained with a "
        f"{trained:g} mm crop margin): mask voxels where the image is 0 more than {body_margin} voxels "
        "from the head.",
        "",
        "| crop margin at inference | label | mask voxels | outside the head | fraction |",
        "|---|---|---|---|---|",
    ]
    for margin in dict.fromkeys((trained, 0.0)):
        predictor.preprocess = replace(predictor.preprocess, crop_margin_mm=margin)
        result = predictor.predict(t1, list(TISSUES), "mri", affine=affine)
        for label in TISSUES:
            mask = np.asarray(result.masks[label].dataobj) > 0
            outside = voxels_outside(mask, t1 > 0, body_margin)
            lines.append(
                f"| {margin:g} mm | {label} | {int(mask.sum()):,} | {outside:,} | "
                f"{outside / max(int(mask.sum()), 1):.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_anatomy")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--body-margin", type=int, default=2, help="voxels around the head not counted as outside")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    start = time.time()
    out = args.out.resolve()
    data, model_dir, eval_dir = out / "data", out / "model", out / "eval"
    if not (data / "test.jsonl").is_file():
        build_real_halves(data)
    manifests = [f"data.train_manifest={data / 'train.jsonl'}", f"data.test_manifest={data / 'test.jsonl'}"]
    checkpoint = model_dir / "checkpoints" / "last.ckpt"
    trained_before = finished_step(checkpoint) >= args.steps
    train_stage(
        "real_anatomy", model_dir, args.steps, [*manifests, f"hydra.run.dir={model_dir}", *args.overrides]
    )
    train_minutes = (time.time() - start) / 60
    run(["eval.py", f"ckpt_path={checkpoint}", *manifests[1:], f"output_dir={eval_dir}", "metrics.tolerance_overrides={liver: 5}"])
    report = [
        f"Held-out halves (trained {args.steps} steps on the posterior halves; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; NSD tolerance 1 mm, liver 5 mm):",
        "",
        held_out_table(eval_dir),
        "",
        specks_table(checkpoint, args.body_margin),
        "",
        ("Training: done by an earlier run of this command. " if trained_before else f"Training: {train_minutes:.1f} min. ")
        + f"This command: {(time.time() - start) / 60:.1f} min.",
    ]
    text = "\n".join(report)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

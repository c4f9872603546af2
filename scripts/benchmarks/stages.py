"""Where predict's wall time goes: per-stage seconds of one CT-sized case and the network's share.

    python scripts/benchmarks/stages.py [--presets tiny nano] [--labels 5] [--window-tiny 64 64 32]
        [--window-nano 64 64 32] [--overlap 0.5] [--size 512 512 120] [--threads N]

One process: the random-weight student of ``predict.py``'s presets (8 region experts), the synthetic CT
(``--size`` voxels at 0.8x0.8x2.5 mm, written as int16 .nii.gz and read back like a real input), ``--labels``
abdominal prompts (one expert). Stages are timed by wrapping the Predictor's own functions: reading,
preprocessing, the network (every window batch through :class:`WindowModel`), stitching (the rest of the
sliding window: cutting windows, gaussian blending), inversion to the input grid, assembling masks and
the multilabel map, writing the case folder (NIfTI masks, segmentation, preview); the body mask (where masks
may lie) and ``other`` (the rest of ``Predictor.predict``: planning, queries, copies) complete its wall time.
``start-up`` is a fresh interpreter importing what ``python predict.py`` imports, from its launch to the end
of those imports, and ``exit`` the same interpreter's exit after them (with the objects of start-up frozen
out of garbage collection, as ``predict.py`` does once its model is loaded); both measured once, before
the presets.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lorkd.data.transforms as transforms_module  # noqa: E402
import lorkd.inference.predictor as predictor_module  # noqa: E402
from lorkd.inference.predictor import Predictor  # noqa: E402
from lorkd.inference.sliding_window import WindowModel  # noqa: E402
from lorkd.inference.writer import save_prediction  # noqa: E402
from lorkd.regions import RegionMap  # noqa: E402
from scripts.benchmarks.predict import build_model, ct_volume  # noqa: E402

STAGES = ("reading", "preprocessing", "body mask", "network", "stitching", "inversion", "assembling", "other", "writing")
# what ``python predict.py`` imports before its first case (the one-process path: no Lightning, peft or MONAI)
STARTUP = (
    "import lorkd.cli, lorkd.commands.predict, lorkd.inference.case_runner, lorkd.inference.predictor, lorkd.inference.writer"
    "; import time; from lorkd.utils import freeze_startup_objects; freeze_startup_objects(); print(time.time())"
)


class StageTimer:
    """Accumulates seconds per stage; ``wrap`` times every call of a function under a stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
            return self._consumed(stage, result) if isinstance(result, Iterator) else result

        return timed

    def _consumed(self, stage: str, items: Iterator) -> Iterator:
        """``items``, timing the work of each item (a generator's work happens as it is consumed)."""
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.seconds[stage] += time.perf_counter() - start
            yield item


def startup_seconds() -> tuple[float, float]:
    """(start-up, exit) of a fresh interpreter importing predict's modules (the checkpoint loading is not included)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    launched = time.time()
    imported = float(subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, check=True, env=env, capture_output=True, text=True).stdout)
    return imported - launched, time.time() - imported


def install(timer: StageTimer) -> None:
    """Wrap the Predictor's stage functions (module globals, so ``Predictor.predict`` calls the wrappers)."""
    predictor_module.read_input = timer.wrap("reading", predictor_module.read_input)
    predictor_module.preprocess_image = timer.wrap("preprocessing", predictor_module.preprocess_image)
    predictor_module.body_mask = timer.wrap("body mask", predictor_module.body_mask)
    predictor_module.sliding_window_probabilities = timer.wrap(
        "sliding window", predictor_module.sliding_window_probabilities
    )
    predictor_module.invert_to_original = timer.wrap("inversion", predictor_module.invert_to_original)
    transforms_module.group_above = timer.wrap("inversion", transforms_module.group_above)  # inside invert_above
    transforms_module.invert_group = timer.wrap("inversion", transforms_module.invert_group)
    predictor_module._Assembler.add = timer.wrap("assembling", predictor_module._Assembler.add)
    WindowModel.__call__ = timer.wrap("network", WindowModel.__call__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "nano"])
    parser.add_argument("--labels", type=int, default=5, help="abdominal prompts")
    parser.add_argument("--window-tiny", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--window-nano", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=None, help="default: the Predictor's choice")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 120], help="CT voxels (0.8x0.8x2.5 mm)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    regions = RegionMap.from_config("demo")
    labels = sorted(k.split("_", 1)[1] for k, r in regions.label_region.items() if r == "abdomen" and k.startswith("ct_"))
    labels = labels[: args.labels]
    volume, affine = ct_volume()
    volume = volume[: args.size[0], : args.size[1], : args.size[2]]
    timer = StageTimer()
    install(timer)
    startup, exit_ = startup_seconds()
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {volume.shape} CT, {len(labels)} labels, overlap {args.overlap}, sw_batch_size {args.sw_batch_size or 'the Predictor default'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print("| preset | window | windows | " + " | ".join(STAGES) + " | start-up | exit | total | network share | non-network share |")
    print("|---|---|---|" + "---|" * (len(STAGES) + 5))
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(volume).astype(np.int16), affine), image)  # stored as CTs are: int16 HU
        for preset in args.presets:
            window = args.window_tiny if preset == "tiny" else args.window_nano
            predictor = Predictor(
                build_model(preset, window, regions, labels), device="cpu", overlap=args.overlap,
                sw_batch_size=args.sw_batch_size,
            )  # fmt: skip
            predictor.predict(volume[100:140, 100:140, :20], labels[:1], "ct", affine=affine)  # one-time allocations
            timer.seconds.clear()
            windows = [0]
            start = time.perf_counter()
            prediction = predictor.predict(image, labels, "ct", progress=lambda done, total, w=windows: w.__setitem__(0, total))
            wall = time.perf_counter() - start
            start = time.perf_counter()
            save_prediction(prediction, Path(tmp) / preset, case="ct")
            timer.seconds["writing"] = time.perf_counter() - start
            s = dict(timer.seconds)
            s["stitching"] = s.pop("sliding window") - s["network"]
            s["other"] = wall - sum(v for k, v in s.items() if k != "writing")
            total = sum(s[k] for k in STAGES) + startup + exit_
            cells = " | ".join(f"{s[k]:.1f}" for k in STAGES)
            print(f"| {preset} | {'x'.join(map(str, predictor.window))} | {windows[0]} | {cells} | {startup:.1f} | {exit_:.1f} | {total:.1f} "
                  f"| {s['network'] / total:.1%} | {1 - s['network'] / total:.1%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Start-up of ``python predict.py``: seconds from launching the command to its first window.

    python scripts/benchmarks/startup.py --ckpt CKPT [--ckpt EXPORT_DIR ...] --input IMAGE --labels liver spleen
        [--modality ct] [--rounds 3] [--compare-tree OLD_CHECKOUT]

Each row launches a fresh interpreter. ``predict.py`` rows run the real command (Hydra, Lightning,
checkpoint loading, reading and preprocessing the case) with a post-import hook that timestamps the
first call of :class:`lorkd.inference.sliding_window.WindowModel` (``first window in``) and its return
(``first window done``), then exits. Baselines in the same run: ``python -c "import torch"`` and, with
``--compare-tree``, the same command run from another checkout (e.g. ``git archive <commit>`` of the
code before a change). Rows take turns within each round; the table shows the median over rounds and
which heavy packages the process had imported when the first window started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("peft", "transformers", "wandb", "lightning", "monai", "torch._dynamo", "scipy", "pandas")

# Runs in the child: wraps WindowModel.__call__ when its module is imported, then runs predict.py.
CHILD = r"""
import importlib.abc, importlib.util, json, os, runpy, sys, time
T0, REPORT, HEAVY = float(os.environ["STARTUP_T0"]), os.environ["STARTUP_REPORT"], os.environ["STARTUP_HEAVY"].split(",")

def patch(module):
    call = module.WindowModel.__call__
    def first(self, windows):
        entered = time.time() - T0
        loaded = [m for m in HEAVY if m in sys.modules]
        out = call(self, windows)
        with open(REPORT, "w") as f:
            json.dump({"in": entered, "done": time.time() - T0, "loaded": loaded}, f)
        os._exit(0)
    module.WindowModel.__call__ = first

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lorkd.inference.sliding_window":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch(argv: list[str], tree: Path, report: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), STARTUP_REPORT=str(report), STARTUP_HEAVY=",".join(HEAVY))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    report.unlink(missing_ok=True)
    env["STARTUP_T0"] = repr(time.time())
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if argv[1] != CHILD:
        if done.returncode:
            raise SystemExit(done.stderr)
        return {"in": wall, "done": wall, "loaded": []}
    if not report.is_file():
        raise SystemExit(f"{' '.join(argv)} ended (exit {done.returncode}) before any window:\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="a checkpoint or export folder (repeatable)")
    parser.add_argument("--input", required=True, help="one image (NIfTI)")
    parser.add_argument("--labels", nargs="+", required=True, help="labels cached in the checkpoint's prompt bank")
    parser.add_argument("--modality", default="ct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-tree", type=Path, default=None, help="another checkout to run the same command from")
    args = parser.parse_args()

    trees = {"this tree": ROOT} | ({"compare tree": args.compare_tree.resolve()} if args.compare_tree else {})
    labels = "[" + ",".join(args.labels) + "]"
    rows: dict[str, tuple[list[str], Path]] = {'python -c "import torch"': (["-c", "import torch"], ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.ckpt:
            for tree_name, tree in trees.items():
                argv = [
                    "-c", CHILD, "predict.py", f"ckpt_path={Path(ckpt).resolve()}", f"input={Path(args.input).resolve()}",
                    f"labels={labels}", f"modality={args.modality}", f"output_dir={tmp}/{len(rows)}", "progress=false",
                ]  # fmt: skip
                rows[f"predict.py {Path(ckpt).name} ({tree_name})"] = (argv, tree)
        times: dict[str, list[dict]] = {name: [] for name in rows}
        for r in range(args.rounds):
            order = list(rows) if r % 2 == 0 else list(reversed(rows))
            for name in order:
                argv, tree = rows[name]
                times[name].append(launch(argv, tree, Path(tmp) / "report.json"))
                print(f"round {r + 1}: {name}: {times[name][-1]['done']:.2f} s", file=sys.stderr, flush=True)

    base = statistics.median(t["done"] for t in times['python -c "import torch"'])
    print(f"# {args.rounds} rounds, median; load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| command | first window in (s) | first window done (s) | vs import torch | imported at the first window |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        t_in = statistics.median(t["in"] for t in samples)
        t_done = statistics.median(t["done"] for t in samples)
        loaded = ", ".join(samples[-1]["loaded"]) or "-"
        print(f"| {name} | {t_in:.2f} | {t_done:.2f} | {t_done / base:.2f}x | {loaded} |")


if __name__ == "__main__":
    main()

"""Every logger the README offers (csv, tensorboard, wandb offline) runs a 2-step fit and writes its files."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import demo_overrides

ROOT = Path(__file__).resolve().parents[1]


def _train(logger: str, data: Path, out: Path) -> None:
    """``python train.py experiment=demo_teacher`` for 2 steps with ``logger=...`` (a subprocess: W&B
    starts its own service process, which must not outlive a test)."""
    overrides = [o for o in demo_overrides(data, out) if not o.startswith("logger=")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "train.py", "experiment=demo_teacher", *overrides, f"logger={logger}"]
    done = subprocess.run(
        [*command, f"paths.output_dir={out}", f"hydra.run.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _csv_metrics(out: Path) -> list[dict[str, str]]:
    with (out / "csv" / "metrics.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_each_documented_logger_runs_a_two_step_fit(logger, tiny_demo_data, tmp_path):
    _train(logger, tiny_demo_data, tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if logger == "csv":
        rows = _csv_metrics(tmp_path)
        assert {row["step"] for row in rows if row.get("train/loss")} == {"0", "1"}
    elif logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
        assert events, "no TensorBoard event file"
        accumulator = EventAccumulator(str(events[0].parent))
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("train/loss")] == [0, 1]
    else:
        runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0

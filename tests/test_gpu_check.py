"""``scripts/benchmarks/gpu_check.py``: stops with one line without CUDA; its prediction check runs on the CPU side."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_check_without_cuda_stops_with_one_line(gpu_check):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main(["--skip-steps"])


@pytest.mark.slow
def test_the_prediction_check_runs_predict_py_end_to_end(gpu_check, tmp_path):
    ckpt, image, labels = gpu_check.prepare_predict_case(tmp_path, "tiny", (32, 32, 16), 2, size=(64, 64, 24))
    seconds, peak = gpu_check.run_predict_cli(ckpt, image, labels, tmp_path / "out")
    assert seconds > 0 and peak == 0.0  # no CUDA memory on the CPU
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["label"] for row in rows) == sorted(labels) and {row["status"] for row in rows} == {"ok"}
    assert (tmp_path / "out" / "ct" / "segmentation.nii.gz").is_file()


TINY_TRAIN = [
    "data.patch_size=[64,64,32]", "data.max_queries=4", "data.num_workers=0", "data.batch_size=2",
    "trainer.accumulate_grad_batches=2",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, network",
    [("nano", ["backbone@model.student=unet_tiny", "teacher.backbone=unet_tiny"]), ("teacher_nano", ["backbone@model.net=unet_tiny"])],
)
def test_the_training_check_fits_the_shipped_experiment_and_times_it(gpu_check, tmp_path, monkeypatch, experiment, network):
    """``--train`` on the CPU with shrinking overrides: the teacher file, the synthetic manifest and the step
    timer are real, the figures come from the fit (2 untimed + 1 timed optimizer step of 2 micro-batches)."""
    monkeypatch.setenv("LORKD_TRAIN_CHECK_DIR", str(tmp_path))
    out = tmp_path / "table.md"
    overrides = [f"--train-override={o}" for o in [*TINY_TRAIN, *network]]
    gpu_check.main(["--train", experiment, "--allow-cpu", "--train-steps", "3", "--train-cases", "2",
                    "--train-shape", "80", "80", "48", "--train-teacher", "unet_tiny", "--out", str(out), *overrides])  # fmt: skip
    timings = json.loads((tmp_path / experiment / "timings.json").read_text())
    assert len(timings["step"]) == 2 and len(timings["wait"]) == 1  # one optimizer step = 2 micro-batches
    assert (tmp_path / "SAT_unet_tiny.pth").is_file() == (experiment == "nano")
    row = [line for line in out.read_text().splitlines() if line.startswith(f"| {experiment} |")]
    assert len(row) == 1 and "| 2 x 2 |" in row[0], out.read_text()
    model_gib = float(row[0].split("|")[8])
    assert model_gib > 0  # the memory model's estimate of this very config

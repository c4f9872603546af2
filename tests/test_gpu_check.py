"""``scripts/benchmarks/gpu_check.py``: stops with one line without CUDA; its prediction check runs on the CPU side."""

import csv
import importlib.util
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

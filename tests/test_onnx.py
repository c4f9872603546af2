"""ONNX experts: ``lorkd-export ... onnx=true`` and the Predictor running them with onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config

from lorkd.checkpoints.exported import ExportIntegrityError
from lorkd.checkpoints.onnx import OnnxExpert
from lorkd.commands.export import export
from lorkd.commands.predict import predict
from lorkd.inference.predictor import Predictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
REGIONS = ["abdomen", "thorax", "brain"]  # the demo test cases' experts


@pytest.fixture(scope="module")
def onnx_export(distinct_lorkd_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "demo"
    export(compose_config("export", [f"ckpt_path={distinct_lorkd_ckpt}", f"output_dir={out}", f"only=[{','.join(REGIONS)}]", "onnx=true"]))
    return out


def _demo_cases(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_onnx_experts_give_the_masks_of_the_torch_experts_on_the_demo_test_cases(onnx_export, tiny_demo_data):
    index = json.loads((onnx_export / "index.json").read_text())
    assert set(index["onnx"]) == set(REGIONS) and index["onnx"]["abdomen"]["window"] == [32, 32, 16]
    options = dict(device="cpu", overlap=0.0, sw_batch_size=8)  # fewer windows: the comparison is per window
    torch_predictor = Predictor.from_checkpoint(onnx_export, **options)
    onnx_predictor = Predictor.from_checkpoint(onnx_export, runtime="onnx", **options)
    assert onnx_predictor.window == torch_predictor.window == (32, 32, 16)
    assert isinstance(onnx_predictor.model.for_expert(0)[0], OnnxExpert)
    for case in _demo_cases(tiny_demo_data):
        image = tiny_demo_data / case["image"]
        a = torch_predictor.predict(image, case["label"], case["modality"], return_probabilities=True)
        b = onnx_predictor.predict(image, case["label"], case["modality"], return_probabilities=True)
        assert a.routes == b.routes and set(a.routes.values()) <= set(REGIONS)
        for label in case["label"]:
            p, q = np.asarray(a.probabilities[label].dataobj), np.asarray(b.probabilities[label].dataobj)
            np.testing.assert_allclose(p, q, atol=1e-4)
            # float rounding differs between the runtimes: only voxels within 1e-4 of the threshold may flip
            # (the 2-step demo model's probabilities crowd around 0.5, so these are up to ~0.3% of the voxels)
            near = np.abs(p - torch_predictor.threshold) < 1e-4
            mask_a, mask_b = np.asarray(a.masks[label].dataobj), np.asarray(b.masks[label].dataobj)
            assert np.array_equal(mask_a[~near], mask_b[~near]) and near.mean() < 0.01


@pytest.mark.slow
def test_predict_cli_runs_onnx_experts_and_checks_their_files(onnx_export, tiny_demo_data, tmp_path):
    case = _demo_cases(tiny_demo_data)[0]
    out = tmp_path / "out"
    overrides = [f"ckpt_path={onnx_export}", f"input={tiny_demo_data / case['image']}", f"output_dir={out}",
                 "labels=[liver,spleen]", "modality=ct", "progress=false", "writer.preview=false",
                 "inference.runtime=onnx"]  # fmt: skip
    rows = predict(compose_config("predict", overrides))
    assert {(r["label"], r["expert"], r["status"]) for r in rows} == {("liver", "abdomen", "ok"), ("spleen", "abdomen", "ok")}
    copy = tmp_path / "tampered"
    copy.mkdir()
    for path in onnx_export.rglob("*"):
        target = copy / path.relative_to(onnx_export)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.write_bytes(path.read_bytes())
    with (copy / "thorax" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportIntegrityError, match="model.onnx"):
        Predictor.from_checkpoint(copy, runtime="onnx")


def test_onnx_runtime_needs_an_export(tiny_lorkd_ckpt, tiny_export):
    with pytest.raises(ValueError, match="needs an export directory"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, runtime="onnx")
    with pytest.raises(FileNotFoundError, match="onnx=true"):
        Predictor.from_checkpoint(tiny_export, runtime="onnx")

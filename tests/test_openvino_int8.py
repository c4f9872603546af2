"""OpenVINO int8 (NNCF post-training quantisation): an option with its calibration cases, cached per calibration set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lorkd.data.manifest import ManifestError
from lorkd.inference import openvino_runtime
from lorkd.inference.predictor import Predictor

pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")


@pytest.fixture
def quantisations(monkeypatch) -> list[int]:
    """The number of calibration samples of every network NNCF quantised."""
    calls: list[int] = []
    real = nncf.quantize

    def spy(model, dataset, **kwargs):
        calls.append(kwargs["subset_size"])
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(nncf, "quantize", spy)
    return calls


def _manifest(path: Path, data: Path, ids: list[str]) -> Path:
    """A calibration manifest of the demo training cases ``ids`` (absolute image paths)."""
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    chosen = [{**r, "image": str(data / r["image"])} for r in rows if r["id"] in ids]
    assert len(chosen) == len(ids)
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


def test_int8_refuses_without_calibration_cases(tiny_lorkd_ckpt, tiny_demo_data, tmp_path):
    options = dict(device="cpu", runtime="openvino", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision=int8 needs calibration cases: inference.calibration="):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", **options)
    with pytest.raises(ValueError, match="precision=int8 only, not 'f32'"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, calibration=tmp_path, **options)
    with pytest.raises(FileNotFoundError, match=f"calibration {tmp_path} is a folder"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=tmp_path, **options)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=tmp_path / "missing.jsonl", **options)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="empty.jsonl: manifest has no cases"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=tmp_path / "empty.jsonl", **options)
    gone = tmp_path / "gone.jsonl"
    gone.write_text(json.dumps({"image": "nowhere.nii.gz", "label": ["liver"], "modality": "ct"}) + "\n")
    with pytest.raises(ManifestError, match=r"gone.jsonl:1: image .*nowhere.nii.gz not found"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=gone, **options)
    # calibration cases of the abdomen only: a brain label's expert has nothing to be calibrated on
    abdomen = Predictor.from_checkpoint(
        tiny_lorkd_ckpt, precision="int8", calibration=_manifest(tmp_path / "abd.jsonl", tiny_demo_data, ["abdomen_ct_000"]), **options
    )
    with pytest.raises(ValueError, match="no calibration window for this network"):
        abdomen.check(["grey matter"], "mri")
    with pytest.raises(ValueError, match="precision=int8 needs calibration cases"):  # the runtime's own guard
        openvino_runtime.openvino_expert(*abdomen.model.for_expert(0), abdomen.window, {}, "abdomen", 1, "int8", tmp_path)


def test_int8_runs_and_is_quantised_once_per_calibration_set(tiny_lorkd_ckpt, tiny_demo_data, tmp_path, quantisations):
    one = _manifest(tmp_path / "one.jsonl", tiny_demo_data, ["abdomen_ct_000"])
    two = _manifest(tmp_path / "two.jsonl", tiny_demo_data, ["abdomen_ct_000", "abdomen_ct_001"])
    options = dict(device="cpu", runtime="openvino", cache_dir=tmp_path / "cache", threads=1)
    test = json.loads((tiny_demo_data / "test.jsonl").read_text().splitlines()[0])
    image, labels = tiny_demo_data / test["image"], ["liver", "spleen"]
    int8 = Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=one, **options)
    result = int8.predict(image, labels, "ct", return_probabilities=True)
    assert quantisations == [16]  # every calibration window of the one case's abdomen expert
    network = int8._compiled[next(iter(int8._compiled))][0]
    assert "FakeQuantize" in Path(network.path).read_text()  # an int8 model, not the float one
    assert network.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"  # the float rest: not bf16
    reference = Predictor.from_checkpoint(tiny_lorkd_ckpt, **options).predict(image, labels, "ct", return_probabilities=True)
    for label in labels:  # close to f32: quantised, not broken
        p, q = (np.asarray(r.probabilities[label].dataobj) for r in (reference, result))
        assert result.masks[label].shape == reference.masks[label].shape and np.abs(p - q).mean() < 0.02
    Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=one, **options).check(labels, "ct")
    assert quantisations == [16]  # cached
    Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=two, **options).check(labels, "ct")
    assert quantisations == [16, 16]  # another calibration set: quantised again (8 windows of each case)
    calibration_image = Path(json.loads(one.read_text())["image"])
    stat = calibration_image.stat()
    os.utime(calibration_image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rewritten calibration image
    try:
        Predictor.from_checkpoint(tiny_lorkd_ckpt, precision="int8", calibration=one, **options).check(labels, "ct")
    finally:
        os.utime(calibration_image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert quantisations == [16, 16, 16]
    assert len(list((tmp_path / "cache" / "openvino").glob("*/model.xml"))) == 4  # one f32 conversion, three int8

"""Prediction from an export directory: each label runs its region's merged standalone model."""

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_config

from lorkd.checkpoints.export import export_experts
from lorkd.inference.predictor import Predictor
from lorkd.inference.run import predict


@pytest.fixture(scope="module")
def distinct_experts(tiny_lorkd_ckpt, tmp_path_factory):
    """The 2-step LoRKD checkpoint with random expert B weights (experts differ from the base) and its export."""
    raw = torch.load(tiny_lorkd_ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in raw["state_dict"].items():
        if ".lora_B." in key:
            raw["state_dict"][key] = torch.randn(value.shape, generator=g) * 0.05
    folder = tmp_path_factory.mktemp("export_predict")
    ckpt = folder / "lorkd.ckpt"
    torch.save(raw, ckpt)
    return ckpt, export_experts(ckpt, folder / "export")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 20.0, (40, 36, 12)).astype(np.float32)
    image[8:30, 6:26, 2:9] += 120.0
    path = tmp_path_factory.mktemp("scan") / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.2, 1.2, 3.5, 1.0])), path)
    return path


def test_an_export_predicts_like_the_routed_student(distinct_experts, scan):
    ckpt, export = distinct_experts
    labels = ["liver", "left lung", "spleen"]  # abdomen and thorax experts
    options = dict(device="cpu", threshold=0.5)
    routed = Predictor.from_checkpoint(ckpt, **options).predict(scan, labels, "ct", return_probabilities=True)
    merged = Predictor.from_checkpoint(export, **options).predict(scan, labels, "ct", return_probabilities=True)
    assert merged.routes == routed.routes == {"liver": "abdomen", "left lung": "thorax", "spleen": "abdomen"}
    for label in labels:
        a, b = routed.probabilities[label], merged.probabilities[label]
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
        np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-4)
    with pytest.raises(ValueError, match="not the teacher"):
        Predictor.from_checkpoint(export, model="teacher")


def test_predict_cli_on_an_export(distinct_experts, scan, tmp_path):
    _, export = distinct_experts
    out = tmp_path / "out"
    overrides = [f"ckpt_path={export}", f"input={scan}", f"output_dir={out}", "labels=[liver,heart]",
                 "modality=ct", "progress=false", "writer.preview=false"]  # fmt: skip
    rows = predict(compose_config("predict", overrides))
    assert {r["status"] for r in rows} == {"ok"}
    mask = nib.load(out / "case" / "liver.nii.gz")
    assert mask.shape == nib.load(scan).shape and (out / "case" / "segmentation.nii.gz").is_file()

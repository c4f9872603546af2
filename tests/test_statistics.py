"""``writer.statistics=true``: per-label volume and intensity statistics in ``statistics.json``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from helpers import compose_config
from test_predict_cli import write_case

from lorkd.commands.predict import predict
from lorkd.inference.predictor import Prediction
from lorkd.inference.statistics import label_statistics
from lorkd.inference.writer import save_prediction

AFFINE = np.diag([2.0, 1.0, 3.0, 1.0])  # 6 mm³ voxels


def _prediction(modality: str = "ct") -> Prediction:
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) - 1000.0
    liver = np.zeros(image.shape, np.uint8)
    liver[1:3, 2:4, 0:5] = 1
    empty = np.zeros(image.shape, np.uint8)
    masks = {"liver": nib.Nifti1Image(liver, AFFINE), "spleen": nib.Nifti1Image(empty, AFFINE)}
    return Prediction(
        masks=masks, segmentation=nib.Nifti1Image(liver, AFFINE), label_ids={1: "liver", 2: "spleen"},
        routes={"liver": "abdomen", "spleen": "abdomen"}, image=nib.Nifti1Image(image, AFFINE), modality=modality,
    )  # fmt: skip


def test_statistics_are_volume_and_intensities_inside_each_mask():
    prediction = _prediction()
    stats = label_statistics(prediction)
    image = np.asarray(prediction.image.dataobj)
    inside = image[1:3, 2:4, 0:5]
    liver = stats["labels"]["liver"]
    assert stats["unit"] == "HU" and stats["voxel_volume_ml"] == 0.006
    assert liver["voxels"] == 20 and liver["volume_ml"] == 0.12
    assert np.isclose(liver["mean"], inside.mean()) and np.isclose(liver["std"], inside.std())
    assert (liver["min"], liver["max"]) == (float(inside.min()), float(inside.max()))
    assert stats["labels"]["spleen"] == {"voxels": 0, "volume_ml": 0.0, "mean": None, "std": None, "min": None, "max": None}
    assert label_statistics(_prediction("mri"))["unit"] == "image intensity"


def test_statistics_json_is_written_only_on_request(tmp_path):
    marker = save_prediction(_prediction(), tmp_path / "a", preview=False)
    assert "statistics.json" not in marker["files"] and not (tmp_path / "a" / "statistics.json").exists()
    marker = save_prediction(_prediction(), tmp_path / "b", preview=False, statistics=True)
    assert "statistics.json" in marker["files"]
    written = json.loads((tmp_path / "b" / "statistics.json").read_text())
    assert written["case"] == "b" and written["labels"]["liver"]["voxels"] == 20


def test_predict_cli_writes_statistics_of_the_saved_masks(tiny_lorkd_ckpt, tmp_path):
    scan = write_case(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"input={scan}", f"output_dir={out}", "labels=[liver,spleen]",
                 "modality=ct", "progress=false", "writer.preview=false", "writer.statistics=true",
                 "inference.threshold=0.0"]  # fmt: skip  (every voxel in both masks: statistics of the whole image)
    rows = predict(compose_config("predict", overrides))
    assert {r["status"] for r in rows} == {"ok"}
    stats = json.loads((out / "scan" / "statistics.json").read_text())
    image = np.asarray(nib.load(scan).dataobj, dtype=np.float64)
    for label in ("liver", "spleen"):
        mask = np.asarray(nib.load(out / "scan" / f"{label}.nii.gz").dataobj).astype(bool)
        entry = stats["labels"][label]
        assert entry["voxels"] == int(mask.sum()) > 0
        assert np.isclose(entry["mean"], image[mask].mean(), rtol=1e-5)
        assert np.isclose(entry["std"], image[mask].std(), rtol=1e-5)
        assert entry["volume_ml"] == next(r["volume_ml"] for r in rows if r["label"] == label)

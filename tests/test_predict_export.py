"""Prediction from an export directory: each label runs its region's merged standalone model."""

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_config

from lorkd.commands.predict import predict
from lorkd.inference.predictor import Predictor


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 20.0, (40, 36, 12)).astype(np.float32)
    image[8:30, 6:26, 2:9] += 120.0
    path = tmp_path_factory.mktemp("scan") / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.2, 1.2, 3.5, 1.0])), path)
    return path


def test_an_export_predicts_like_the_routed_student(distinct_lorkd_ckpt, tiny_export, scan):
    ckpt, export = distinct_lorkd_ckpt, tiny_export
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
        Predictor.from_checkpoint(export, network="teacher")


def test_predict_cli_on_an_export(tiny_export, scan, tmp_path):
    export = tiny_export
    out = tmp_path / "out"
    overrides = [f"ckpt_path={export}", f"input={scan}", f"output_dir={out}", "labels=[liver,heart]",
                 "modality=ct", "progress=false", "writer.preview=false"]  # fmt: skip
    rows = predict(compose_config("predict", overrides))
    assert {r["status"] for r in rows} == {"ok"}
    mask = nib.load(out / "case" / "liver.nii.gz")
    assert mask.shape == nib.load(scan).shape and (out / "case" / "segmentation.nii.gz").is_file()


def test_a_replaced_expert_file_stops_the_run_naming_it(tiny_export, scan, tmp_path):
    import shutil

    from lorkd.exit_codes import NotStarted

    export = shutil.copytree(tiny_export, tmp_path / "export")
    replaced = export / "abdomen" / "model.safetensors"
    shutil.copyfile(export / "thorax" / "model.safetensors", replaced)
    out = tmp_path / "out"
    overrides = [f"ckpt_path={export}", f"input={scan}", f"output_dir={out}", "labels=[liver]", "modality=ct",
                 "progress=false"]  # fmt: skip
    with pytest.raises(NotStarted, match=rf"^{replaced}: sha256 \w+ does not match the recorded"):
        predict(compose_config("predict", overrides))
    assert not (out / "case").exists()  # no case ran

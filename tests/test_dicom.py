"""DICOM series in (geometry, bad series) and DICOM-SEG out, through ``python predict.py``."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_dicom_series
from helpers import compose_config

from lorkd.commands.predict import predict
from lorkd.data.image_reader import CaseError, read_volume
from lorkd.exit_codes import NotStarted
from lorkd.inference.inputs import discover_cases

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")


def oblique_affine() -> np.ndarray:
    """A scanner-like RAS affine: x and y flipped (DICOM's LPS), rotated about z, anisotropic spacing."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.1, -1.0, 3.0])
    affine[:3, 3] = [12.0, -20.0, 30.0]
    return affine


def axial_affine() -> np.ndarray:
    """An axial scanner's RAS affine whose DICOM decimal strings are exact (so both inputs match bit for bit)."""
    affine = np.diag([-0.75, -0.75, 3.0, 1.0])
    affine[:3, 3] = [12.5, -20.25, 30.0]
    return affine


def ct_volume(shape=(36, 30, 10), seed: int = 0) -> np.ndarray:
    """Integer HU values (DICOM stores integers) with a bright block."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-100, 200, shape).astype(np.float32)
    volume[6:28, 6:22, 2:8] += 300.0
    return volume


def test_a_series_reads_back_with_the_volume_and_geometry_it_was_written_from(tmp_path):
    volume, affine = ct_volume(), oblique_affine()
    write_dicom_series(volume, affine, tmp_path / "series")
    read = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(read.data, volume)  # rescale intercept applied, slices in position order
    np.testing.assert_allclose(read.affine, affine, atol=1e-5)


def test_stored_values_are_rescaled_by_slope_and_intercept(tmp_path):
    """A scanner that stores half-HU steps: value = stored × 0.5 + (−1000.0), so 201 stored reads back as −899.5."""
    volume = ct_volume() / 2  # multiples of 0.5 HU
    files = write_dicom_series(volume, oblique_affine(), tmp_path / "series", slope=0.5, intercept=-1000.0)
    header = pydicom.dcmread(files[0])
    assert float(header.RescaleSlope) == 0.5 and float(header.RescaleIntercept) == -1000.0
    np.testing.assert_array_equal(read_volume(tmp_path / "series").data, volume)


def _series(tmp_path: Path, name: str, **options) -> Path:
    write_dicom_series(ct_volume((12, 10, 5)), oblique_affine(), tmp_path / name, **options)
    return tmp_path / name


def test_bad_series_are_case_errors_that_name_the_folder_and_the_problem(tmp_path):
    missing = _series(tmp_path, "missing")
    positions = {p: float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in missing.iterdir()}
    sorted(positions, key=positions.get)[2].unlink()  # a middle slice
    mixed = _series(tmp_path, "mixed")
    _series(tmp_path, "other", seed=1)
    for i, path in enumerate(sorted((tmp_path / "other").iterdir())):
        shutil.copy(path, mixed / f"other{i}")
    not_image = _series(tmp_path, "not_image")
    report = pydicom.dcmread(next(not_image.iterdir()))
    del report.ImagePositionPatient, report.ImageOrientationPatient, report.PixelData
    report.save_as(not_image / "report.dcm")
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(next(missing.iterdir()), single / "one.dcm")
    cases = {
        missing: r"missing: uneven slice spacing: 6\.000 mm .* against 3\.000 mm .*missing slices",
        mixed: "mixed: holds 2 DICOM series",
        not_image: "not_image: 1 file\\(s\\) are not images",
        single: "single: a single slice is not a 3-D series",
    }
    for folder, message in cases.items():
        with pytest.raises(CaseError, match=message):
            read_volume(folder)


def test_inputs_find_a_series_folder_and_series_folders_next_to_nifti_files(tmp_path):
    series = _series(tmp_path / "scans", "patient_b")
    nib.save(nib.Nifti1Image(ct_volume((12, 10, 5)), oblique_affine()), tmp_path / "scans" / "patient_a.nii.gz")
    (tmp_path / "scans" / "empty_folder").mkdir()
    found = discover_cases(tmp_path / "scans", ["liver"], "ct")
    assert [(c.id, c.image.name) for c in found] == [("patient_a", "patient_a.nii.gz"), ("patient_b", "patient_b")]
    assert [c.image for c in discover_cases(series, ["liver"], "ct")] == [series.resolve()]


def _summary(out: Path) -> dict[str, set[str]]:
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    statuses: dict[str, set[str]] = {}
    for row in rows:
        statuses.setdefault(row["case"], set()).add(row["status"])
    return statuses


@pytest.mark.slow
def test_predict_on_dicom_series_equals_the_nifti_and_writes_dicom_seg(tiny_lorkd_ckpt, tmp_path):
    volume, affine = ct_volume(), axial_affine()  # oblique geometry: test_a_series_reads_back_...
    nifti = tmp_path / "nifti" / "scan.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), nifti)
    series = tmp_path / "dicom" / "scan"
    files = write_dicom_series(volume, affine, series)
    broken = _series(tmp_path / "dicom", "broken")
    next(iter(sorted(broken.iterdir()))).write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    common = ["modality=ct", "progress=false", "writer.preview=false", "labels=[liver,spleen]", "writer.save_probabilities=true"]
    run = lambda source, out, *extra: predict(compose_config(  # noqa: E731
        "predict", [f"ckpt_path={tiny_lorkd_ckpt}", f"input={source}", f"output_dir={out}", *common, *extra]))
    run(nifti, tmp_path / "probe")  # the 2-step model's probabilities crowd around one value: threshold at their median
    median = float(np.median(np.asarray(nib.load(tmp_path / "probe" / "scan" / "probabilities" / "liver.nii.gz").dataobj)))
    run(nifti, tmp_path / "out_nifti", f"inference.threshold={median}")
    run(tmp_path / "dicom", tmp_path / "out_dicom", f"inference.threshold={median}", "writer.format=dicom_seg")
    assert _summary(tmp_path / "out_dicom") == {"broken": {"error"}, "scan": {"ok"}}
    masks = {}
    for name in ("liver", "spleen", "probabilities/liver", "probabilities/spleen"):
        a = nib.load(tmp_path / "out_nifti" / "scan" / f"{name}.nii.gz")
        b = nib.load(tmp_path / "out_dicom" / "scan" / f"{name}.nii.gz")
        assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-5)
        masks[name] = np.asarray(b.dataobj)
        np.testing.assert_array_equal(np.asarray(a.dataobj), masks[name])  # voxel for voxel
    assert 0 < masks["liver"].sum() < masks["liver"].size  # the comparison is not between empty or full masks

    seg = hd.seg.segread(tmp_path / "out_dicom" / "scan" / "segmentation.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    sources = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(sources)
    for uid, path in sources.items():
        k = int(pydicom.dcmread(path).InstanceNumber) - 1  # the writer's slice index
        frame = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2])[0]  # (rows, columns, segments)
        for s, label in enumerate(("liver", "spleen")):
            np.testing.assert_array_equal(frame[..., s], masks[label][:, :, k].T)

    with pytest.raises(NotStarted, match="dicom_seg needs DICOM series inputs"):
        run(nifti, tmp_path / "out_bad", "writer.format=dicom_seg")

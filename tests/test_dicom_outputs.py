"""What we write for DICOM inputs: DICOM-SEG text (any script), its SNOMED codes and content creator,
the series checked before the network runs, and the NIfTI masks' coordinate codes (as dcm2niix writes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_dicom_series
from helpers import compose_config

from lorkd.commands.predict import predict
from lorkd.data.image_reader import CaseError
from lorkd.inference.inputs import discover_cases
from lorkd.inference.prediction_task import PredictionTask
from lorkd.inference.predictor import Prediction, Predictor, read_input

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
from lorkd.inference.dicom_seg import check_source, write_dicom_seg  # noqa: E402  (needs highdicom)

AFFINE = np.diag([-0.75, -0.75, 3.0, 1.0])
SHAPE = (12, 10, 4)
LONG = "intervertebral disc between thoracic vertebrae 10 (t10) and thoracic vertebrae 11 (t11)"


def _series(folder: Path, **attributes) -> Path:
    """A small CT series; ``attributes`` set on every slice (None: deleted)."""
    volume = np.random.default_rng(0).integers(-100, 200, SHAPE).astype(np.float32)
    for path in write_dicom_series(volume, AFFINE, folder):
        dataset = pydicom.dcmread(path)
        for key, value in attributes.items():
            if value is None:
                delattr(dataset, key)
            else:
                setattr(dataset, key, value)
        dataset.save_as(path)
    return folder


def _prediction(labels: list[str]) -> Prediction:
    rng = np.random.default_rng(1)
    masks = {label: nib.Nifti1Image((rng.random(SHAPE) > 0.5).astype(np.uint8), AFFINE) for label in labels}
    first = masks[labels[0]]
    return Prediction(masks, first, {i: label for i, label in enumerate(labels, 1)}, dict.fromkeys(labels, "abdomen"), first, "ct")


def _segments(path: Path) -> dict[str, pydicom.Dataset]:
    return {item.SegmentLabel: item for item in pydicom.dcmread(path).SegmentSequence}


def _code(item: pydicom.Dataset, sequence: str) -> str:
    return str(item[sequence][0].CodeValue)


def test_segment_labels_in_any_script_read_back_as_written_in_utf8(tmp_path):
    # a Latin-1 source series: its patient name must come through the change of character set too
    source = _series(tmp_path / "series", SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Hans")
    labels = ["hígado", "肝臓", "Ωmega organ", LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns when a value cannot be encoded or is too long
        write_dicom_seg(_prediction(labels), source, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [*labels[:3], LONG[:64]]
    assert seg.SegmentSequence[3].SegmentDescription == LONG  # LO holds 64 characters: the whole name here
    assert "SegmentDescription" not in seg.SegmentSequence[0]
    assert seg.PatientName == "Müller^Hans"
    assert "ContentCreatorName" in seg and str(seg.ContentCreatorName) == "LoRKD^"  # type 2 (0070,0084)
    assert hd.seg.segread(tmp_path / "seg.dcm").get_segment_description(2).segment_label == "肝臓"


def test_segments_carry_snomed_concepts_with_laterality_and_the_organ_of_a_finding(tmp_path):
    source = _series(tmp_path / "series")
    labels = ["left lung", "right kidney", "liver tumor", "left heart atrium", "liver", "thoracic vertebrae 10 (t10)", "Ωmega organ"]
    write_dicom_seg(_prediction(labels), source, tmp_path / "seg.dcm")
    segments = _segments(tmp_path / "seg.dcm")
    category, kind, modifier = (
        "SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence", "SegmentedPropertyTypeModifierCodeSequence",
    )  # fmt: skip
    anatomy, abnormal = "91723000", "49755003"
    expected = {  # label: (category, type, laterality modifier)
        "left lung": (anatomy, "39607008", "7771000"),
        "right kidney": (anatomy, "64033007", "24028007"),
        "left heart atrium": (anatomy, "82471001", None),  # SNOMED's own sided concept: no modifier
        "liver": (anatomy, "10200004", None),
        "thoracic vertebrae 10 (t10)": (anatomy, "7610001", None),
        "Ωmega organ": (anatomy, anatomy, None),  # not in SNOMED: the generic structure
    }
    for label, (cat, typ, side) in expected.items():
        item = segments[label]
        assert (_code(item, category), _code(item, kind)) == (cat, typ), label
        assert (_code(item, modifier) if modifier in item else None) == side, label
        assert "AnatomicRegionSequence" not in item
    tumor = segments["liver tumor"]
    assert (_code(tumor, category), _code(tumor, kind)) == (abnormal, "108369006")  # Neoplasm, not its category
    assert _code(tumor, "AnatomicRegionSequence") == "10200004"  # in the liver


def test_a_series_missing_type2_patient_attributes_is_written_with_them_empty(tmp_path):
    source = _series(tmp_path / "series", PatientID=None, PatientBirthDate=None, AccessionNumber=None)
    write_dicom_seg(_prediction(["liver"]), source, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert "PatientID" in seg and seg.PatientID == "" and seg.PatientBirthDate == ""


def _mixed_study(folder: Path) -> Path:
    _series(folder)
    odd = sorted(folder.iterdir())[1]
    dataset = pydicom.dcmread(odd)
    dataset.StudyInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(odd)
    return folder


def test_what_the_seg_writer_needs_is_checked_naming_the_folder_and_the_attribute(tmp_path):
    with pytest.raises(CaseError, match=r"mixed: StudyInstanceUID differs between slices \(IM\d+: [\d.]+, IM\d+: "):
        check_source(_mixed_study(tmp_path / "mixed"))
    with pytest.raises(CaseError, match="no_frame: 4 image\\(s\\) without FrameOfReferenceUID"):
        check_source(_series(tmp_path / "no_frame", FrameOfReferenceUID=None))
    assert len(check_source(_series(tmp_path / "good"))) == SHAPE[2]


class _NoNetwork:
    """A predictor whose network must not run."""

    class model:
        source = "model.ckpt"

    def predict(self, *args, **kwargs):
        raise AssertionError("the network ran")


def test_a_series_the_seg_writer_cannot_reference_fails_before_the_network_runs(tmp_path):
    (case,) = discover_cases(_mixed_study(tmp_path / "mixed"), ["liver"], "ct")
    task = PredictionTask(_NoNetwork(), tmp_path / "out", format="dicom_seg")
    outcome = task.run(0, case, 0, None)
    assert outcome.status == "error" and outcome.prediction is None
    assert "StudyInstanceUID differs between slices" in outcome.rows[0]["error"]
    assert "mixed" in outcome.rows[0]["error"]


def test_images_of_a_dicom_input_carry_scanner_coordinates_in_mm_as_dcm2niix_writes(tmp_path):
    image = read_input(_series(tmp_path / "series"))
    header = image.header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


def test_predicting_dicom_series_writes_scanner_coded_masks_and_fails_only_the_bad_series(
    tiny_lorkd_ckpt, tmp_path, monkeypatch
):
    data = tmp_path / "dicom"
    _series(data / "good")
    _mixed_study(data / "mixed")
    seen = []
    original = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, image, *a, **k: seen.append(Path(image).name) or original(self, image, *a, **k))
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"input={data}", f"output_dir={tmp_path / 'out'}", "progress=false",
                 "writer.preview=false", "labels=[liver]", "modality=ct", "writer.format=dicom_seg"]  # fmt: skip
    rows = predict(compose_config("predict", overrides))
    assert [(r["case"], r["status"]) for r in rows] == [("good", "ok"), ("mixed", "error")]
    assert "StudyInstanceUID differs" in rows[1]["error"] and seen == ["good"]  # the bad series never ran
    mask = nib.load(tmp_path / "out" / "good" / "liver.nii.gz")
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (1, 1)
    assert mask.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(mask.get_qform(), mask.get_sform(), atol=1e-5)
    seg = pydicom.dcmread(tmp_path / "out" / "good" / "segmentation.dcm")
    assert seg.SpecificCharacterSet == "ISO_IR 192" and "ContentCreatorName" in seg

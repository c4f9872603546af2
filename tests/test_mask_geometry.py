"""Masks on their image (issue 28, item 1): a mask stored in another orientation or at another voxel size
over the same space is brought onto its image's grid; a shifted one fails naming both files, in
training's preprocessing, in evaluation and in the manifest checker."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from lorkd.data.geometry import Grid, placement
from lorkd.data.image_reader import CaseError
from lorkd.data.manifest import Case, validate_manifest
from lorkd.data.transforms import PreprocessConfig, preprocess_case, preprocess_image, to_preprocessed_grid
from lorkd.evaluation.scoring import evaluate_case
from lorkd.evaluation.settings import MetricSettings

SHAPE = (20, 16, 8)
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 4.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])
LABELS = ["liver", "spleen"]


def truth() -> np.ndarray:
    """A label map that no flip leaves unchanged: a liver block on the left, a spleen block at the back,
    both made of 2x2x2 cells (so halving the resolution keeps it exactly)."""
    ids = np.zeros(SHAPE, np.uint8)
    ids[2:8, 4:12, 2:6] = 1
    ids[12:18, 0:4, 4:8] = 2
    return ids


def las(ids: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored left-to-right (LAS): the array flipped along x, the affine following it."""
    flipped = affine @ nib.orientations.inv_ornt_aff(np.array([[0, -1], [1, 1], [2, 1]]), ids.shape)
    return ids[::-1].copy(), flipped


def halved(ids: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same space at twice the voxel size (outer faces kept)."""
    coarse = affine.copy()
    coarse[:3, :3] *= 2
    coarse[:3, 3] += affine[:3, :3] @ np.full(3, 0.5)  # centre of the first 2x2x2 cell
    return ids[::2, ::2, ::2].copy(), coarse


def shifted(ids: np.ndarray, affine: np.ndarray, mm: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    moved = affine.copy()
    moved[0, 3] += mm
    return ids, moved


def write(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A CT whose body is > 0 HU and whose organs are brighter, so the foreground crop keeps them."""
    values = np.full(SHAPE, 40.0, np.float32)
    values[truth() == 1], values[truth() == 2] = 120.0, 80.0
    return write(tmp_path, "ct.nii.gz", values, AFFINE)


def case_with(image: Path, mask: Path, line: int = 1) -> Case:
    return Case(
        image=image, labels=list(LABELS), modality="ct", dataset="D", mask=mask, masks=None, id="c",
        region=None, orientation=None, line=line, source=image.parent / "m.jsonl",
    )  # fmt: skip


# --------------------------------------------------------------------------- grids


def test_placement_says_same_reoriented_resampled_or_what_differs():
    image = Grid(SHAPE, AFFINE)
    assert placement(Grid(SHAPE, AFFINE + 1e-5), image).how == "same"
    flipped = las(truth(), AFFINE)
    assert placement(Grid(flipped[0].shape, flipped[1]), image).how == "reoriented"
    coarse = halved(truth(), AFFINE)
    assert placement(Grid(coarse[0].shape, coarse[1]), image).how == "resampled"
    with pytest.raises(ValueError, match=r"shifted by 40 mm \(\+40, \+0, \+0 mm\)"):
        placement(Grid(SHAPE, shifted(truth(), AFFINE)[1]), image)
    with pytest.raises(ValueError, match="cover different spaces"):
        placement(Grid((20, 16, 9), AFFINE), image)  # one slice more: not a resampling of the same space


# --------------------------------------------------------------------------- training targets


@pytest.mark.parametrize("store", [las, halved], ids=["LAS", "2x voxels"])
def test_training_targets_of_a_reoriented_or_resampled_mask_are_those_of_the_mask_on_the_image(
    tmp_path, image, store
):
    cfg = PreprocessConfig()
    expected = preprocess_case(case_with(image, write(tmp_path, "seg.nii.gz", truth(), AFFINE)), cfg).masks
    assert expected.any(axis=(1, 2, 3)).all()
    other = write(tmp_path, "seg_other.nii.gz", *store(truth(), AFFINE))
    np.testing.assert_array_equal(preprocess_case(case_with(image, other), cfg).masks, expected)


def test_a_shifted_mask_fails_the_case_naming_both_files(tmp_path, image):
    mask = write(tmp_path, "seg_moved.nii.gz", *shifted(truth(), AFFINE))
    with pytest.raises(CaseError) as info:
        preprocess_case(case_with(image, mask))
    message = str(info.value)
    assert str(mask) in message and str(image) in message and "shifted by 40 mm" in message


# --------------------------------------------------------------------------- evaluation


class PerfectPredictor:
    """Predicts the true masks (on the image's grid, and in the preprocessed grid): Dice 1 wherever the
    reference is read where it lies."""

    threshold = 0.5

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.preprocess = PreprocessConfig()

    def predict(self, image, labels, modality, region=None, orientation=None):
        reference = nib.load(str(image))
        masks = {label: nib.Nifti1Image((self.ids == j + 1).astype(np.uint8), AFFINE) for j, label in enumerate(labels)}
        return SimpleNamespace(masks=masks, image=reference)

    def preprocess_input(self, image, modality, orientation=None):
        array, info = preprocess_image(image, modality, self.preprocess)
        self.info = info
        return None, array, info

    def predict_preprocessed(self, image, labels, modality, region, info):
        onehot = np.stack([(self.ids == j + 1) for j in range(len(labels))]).astype(np.float32)
        return to_preprocessed_grid(onehot, info, "nearest")


@pytest.mark.parametrize("space", ["original", "preprocessed"])
@pytest.mark.parametrize("store", [las, halved], ids=["LAS", "2x voxels"])
def test_eval_reads_a_reoriented_or_resampled_reference_where_it_lies(tmp_path, image, space, store):
    mask = write(tmp_path, "seg_other.nii.gz", *store(truth(), AFFINE))
    rows = evaluate_case(PerfectPredictor(truth()), case_with(image, mask), MetricSettings(space=space), None)
    assert [r["label"] for r in rows] == LABELS
    assert [r["dice"] for r in rows] == [1.0, 1.0]


def test_eval_fails_a_shifted_reference_naming_both_files(tmp_path, image):
    mask = write(tmp_path, "seg_moved.nii.gz", *shifted(truth(), AFFINE))
    with pytest.raises(CaseError, match="shifted by 40 mm") as info:
        evaluate_case(PerfectPredictor(truth()), case_with(image, mask), MetricSettings(), None)
    assert str(mask) in str(info.value) and str(image) in str(info.value)


# --------------------------------------------------------------------------- manifest checker


def test_manifest_checker_reports_a_shifted_mask_with_file_and_line_and_accepts_the_others(tmp_path, image):
    files = {
        "seg_las.nii.gz": las(truth(), AFFINE),
        "seg_coarse.nii.gz": halved(truth(), AFFINE),
        "seg_moved.nii.gz": shifted(truth(), AFFINE),
    }
    for name, (data, affine) in files.items():
        write(tmp_path, name, data, affine)
    lines = [
        {"image": "ct.nii.gz", "mask": name, "label": LABELS, "modality": "ct", "dataset": "D", "id": name}
        for name in files
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    problems = validate_manifest(manifest)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{manifest.resolve()}:3: mask {(tmp_path / 'seg_moved.nii.gz').resolve()} ")
    assert f"does not lie on its image {image.resolve()}: shifted by 40 mm" in problems[0]

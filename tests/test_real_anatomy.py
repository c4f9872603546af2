"""Real scans cut into train/test halves, and the foreground crop's margin on the real MNI152 T1."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from lorkd.data.demo import _package_dir, lits_arrays, mni_arrays
from lorkd.data.real_anatomy import AXIS, build_real_halves, split_half
from lorkd.data.transforms import preprocess_image
from lorkd.evaluation.metrics import voxels_outside

needs_lits = pytest.mark.skipif(_package_dir("liver_ct_segmentation_package") is None, reason="needs the LiTS package")
needs_nilearn = pytest.mark.skipif(_package_dir("nilearn") is None, reason="needs nilearn")


def test_halves_tile_the_volume_in_world_space():
    volume = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = (10, 20, 30)
    (low, a_low), (high, a_high) = (split_half(volume, affine, 1, first) for first in (True, False))
    assert low.shape == (5, 3, 3) and high.shape == (5, 4, 3)
    assert np.array_equal(np.concatenate([low, high], axis=1), volume)
    assert np.allclose(a_low, affine) and np.allclose(a_high @ [0, 0, 0, 1], affine @ [0, 3, 0, 1])


def test_voxels_outside_counts_beyond_the_margin_only():
    body = np.zeros((12, 12, 12), bool)
    body[4:8, 4:8, 4:8] = True
    mask = np.zeros_like(body)
    mask[5, 5, 5] = mask[8, 5, 5] = mask[9, 5, 5] = mask[11, 11, 11] = True  # inside, 1, 2 and 3+ voxels out
    assert voxels_outside(mask, body) == 3
    assert voxels_outside(mask, body, margin=1) == 2
    assert voxels_outside(mask, body, margin=2) == 1


@needs_lits
@needs_nilearn
def test_real_halves_manifests_and_masks(tmp_path):
    manifests = build_real_halves(tmp_path)
    assert [r["id"] for r in manifests["train"]] == ["lits_117_posterior", "mni152_t1_posterior"]
    assert [r["id"] for r in manifests["test"]] == ["lits_117_anterior", "mni152_t1_anterior"]
    lines = [json.loads(t) for t in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert lines == manifests["test"]
    image, ids, affine = lits_arrays()
    liver, tumour = (nib.load(tmp_path / manifests["test"][0]["masks"][k]) for k in ("liver", "liver tumor"))
    half = ids[:, ids.shape[AXIS] // 2 :]
    assert np.array_equal(np.asarray(liver.dataobj), half >= 1)  # LiTS liver: the organ with its tumours
    assert np.array_equal(np.asarray(tumour.dataobj), half == 2)
    assert np.allclose(liver.affine @ [0, 0, 0, 1], affine @ [0, ids.shape[AXIS] // 2, 0, 1])


@needs_nilearn
def test_crop_margin_puts_real_background_between_the_mni_head_and_the_array_faces():
    """With SAT's tight crop the array's faces touch the head; the margin keeps scan background
    around it (as far as the scan reaches: the neck is cut at the bottom of the template)."""
    t1, _, affine = mni_arrays()
    cfg = {"spacing": [2.0, 2.0, 2.0]}
    tight, _ = preprocess_image(t1, "mri", cfg, affine=affine)
    wide, info = preprocess_image(t1, "mri", {**cfg, "crop_margin_mm": 16.0}, affine=affine)
    background = float(wide.min())
    head = wide[0] > background
    tight_head = tight[0] > tight.min()  # tight: head voxels on all six faces
    assert all(np.take(tight_head, i, axis=a).any() for a in range(3) for i in (0, -1))
    for axis in range(3):
        for index in range(8):  # 8 voxels of 2 mm of pure background on each face...
            for face in (index, -1 - index):
                if axis == 2 and face >= 0:  # ...but the bottom, where the scan itself ends at the neck
                    continue
                assert not np.take(head, face, axis=axis).any(), (axis, face)
    assert info.crop_start[2] == 0 and min(info.crop_start[:2]) > 0


@pytest.mark.slow
@needs_nilearn
def test_masks_stay_on_the_real_mni_head(tiny_teacher_ckpt):
    """A teacher after 2 steps labels background too (SAT's behaviour, ``body_mask=False``); with the
    body mask no voxel lies where the T1 is 0 more than 4 voxels (8 mm) from the head: the 5 mm margin
    in whole 3 mm voxels (6 mm) plus one 2 mm voxel of resampling back to the T1's grid."""
    from lorkd.inference import Predictor

    t1, _, affine = mni_arrays()
    predictor = Predictor.from_checkpoint(tiny_teacher_ckpt, device="cpu", overlap=0.0, edge_padding=0)
    predictor.preprocess = replace(predictor.preprocess, spacing=(3.0, 3.0, 3.0))  # 8 windows: seconds
    outside = {}
    for guard in (False, True):
        predictor.body_mask = guard
        result = predictor.predict(t1, ["grey matter", "white matter"], "mri", affine=affine)
        masks = [np.asarray(m.dataobj) > 0 for m in result.masks.values()]
        assert all(m.sum() > 10_000 for m in masks)
        outside[guard] = sum(voxels_outside(m, t1 > 0, margin=4) for m in masks)
    # with the mask: at most a few boundary voxels, where the 3 mm preprocessed grid's margin, resampled back
    # to the 2 mm template, reaches one voxel further (measured: 0-2 of ~95,000)
    assert outside[False] > 10_000 and outside[True] <= 10, outside

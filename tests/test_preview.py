"""preview.png: slice centre and display window computed without full-volume copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lorkd.inference.predictor import Prediction
from lorkd.inference.preview import _centre, _display_range, save_preview


def test_centre_is_the_mean_index_of_the_labelled_voxels():
    rng = np.random.default_rng(0)
    seg = np.zeros((30, 20, 12), np.uint8)
    seg[3:11, 12:19, 2:5] = 1
    seg[rng.random(seg.shape) > 0.97] = 2
    expected = tuple(int(round(c)) for c in np.argwhere(seg > 0).mean(axis=0))
    assert _centre(seg) == expected
    assert _centre(np.zeros((7, 8, 9), np.uint8)) == (3, 4, 4)


def test_display_range_is_the_percentiles_of_a_strided_sample():
    data = np.random.default_rng(1).normal(size=(40, 30, 20)).astype(np.float32)
    assert _display_range(data) == pytest.approx(tuple(np.percentile(data, (1, 99))))  # fewer voxels than samples
    low, high = _display_range(data, samples=2000)  # every 12th voxel
    assert low == pytest.approx(np.percentile(data, 1), abs=0.25) and high == pytest.approx(np.percentile(data, 99), abs=0.25)
    assert _display_range(np.zeros((0, 3, 3), np.int16)) == (0.0, 1.0)


def test_preview_is_written_for_an_int16_image(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = nib.Nifti1Image(np.arange(24 * 20 * 8, dtype=np.int16).reshape(24, 20, 8), affine)
    seg = np.zeros((24, 20, 8), np.uint8)
    seg[5:12, 4:9, 2:6] = 1
    prediction = Prediction(
        {"liver": nib.Nifti1Image(seg, affine)}, nib.Nifti1Image(seg, affine), {1: "liver"}, {"liver": "abdomen"}, image, "ct"
    )
    save_preview(prediction, tmp_path / "preview.png")
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""preview.png: slice centre and display window computed without full-volume copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lorkd.inference.predictor import Prediction
from lorkd.inference.preview import _centre, _display_range, _palette, save_preview, views


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


def test_views_are_radiological_with_superior_and_anterior_up_at_physical_aspect():
    """A label in the patient's right, anterior, superior corner (RAS: high x, y, z) is drawn on the left
    of the axial and coronal views, on the right of the sagittal view, and at the top of each."""
    seg = np.zeros((20, 10, 6), np.uint8)
    seg[15:, 7:, 4:] = 1
    data = np.zeros(seg.shape, np.int16)
    shown = views(data, seg, (1.0, 2.0, 3.0))
    assert [title for title, *_ in shown] == ["axial", "coronal", "sagittal"]
    (_, a, a_labels, a_mm), (_, c, c_labels, c_mm), (_, s, s_labels, s_mm) = shown
    assert a.shape == (10, 20) and a_mm == (20.0, 20.0)  # rows y (2 mm), columns x (1 mm)
    assert c.shape == (6, 20) and c_mm == (20.0, 18.0)
    assert s.shape == (6, 10) and s_mm == (20.0, 18.0)
    for labels, right_side in ((a_labels, False), (c_labels, False), (s_labels, True)):
        rows, cols = np.nonzero(labels)
        assert rows.max() < labels.shape[0] // 2, "superior / anterior is up"
        assert (cols.min() >= labels.shape[1] // 2) == right_side


def test_preview_with_many_long_labels(tmp_path):
    from PIL import Image

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    seg = np.zeros((24, 20, 8), np.uint8)
    names = [f"structure number {i} with a very long descriptive name" for i in range(25)]
    for i in range(25):
        seg[i % 24, :, i % 8] = i + 1
    image = nib.Nifti1Image(np.arange(seg.size, dtype=np.float32).reshape(seg.shape), affine)
    prediction = Prediction(
        {}, nib.Nifti1Image(seg, affine), {i + 1: n for i, n in enumerate(names)}, {}, image, "ct"
    )
    save_preview(prediction, tmp_path / "preview.png")
    with Image.open(tmp_path / "preview.png") as png:
        assert png.format == "PNG" and png.size[0] == 1188
    colours = _palette(25)
    assert colours.shape == (25, 3) and len({tuple(c) for c in colours}) == 25
    assert tuple(_palette(20)[0]) == (31, 119, 180)


def test_drawing_the_preview_does_not_import_matplotlib(tmp_path):
    """matplotlib's import (about 0.5 s) and figure layout were a second of every prediction."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np, nibabel as nib\n"
        "from lorkd.inference.predictor import Prediction\n"
        "from lorkd.inference.preview import save_preview\n"
        "seg = np.zeros((8, 8, 4), np.uint8); seg[2:5, 2:5, 1:3] = 1\n"
        "image = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4))\n"
        "save_preview(Prediction({}, nib.Nifti1Image(seg, np.eye(4)), {1: 'liver'}, {}, image, 'ct'), sys.argv[1])\n"
        "print('matplotlib' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "p.png")], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False" and (tmp_path / "p.png").is_file()

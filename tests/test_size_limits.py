"""Size guards (issue 28, item 4): an image whose header claims a huge shape, whose resampled grid would
not fit, or whose voxels are far finer than the target spacing fails in one line naming the file and
the numbers, before its voxels are read; a real CT passes."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from lorkd.data.limits import MAX_INPUT_VOXELS, SizeError
from lorkd.data.transforms import PreprocessConfig, check_image_size, preprocess_image
from lorkd.inference.predictor import NEUTRAL_OPTIONS, Predictor


def claimed(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Path:
    """A tiny .nii.gz whose header claims ``shape`` but which holds 64 bytes of voxels."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    affine = np.diag([*spacing, 1.0])
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_a_header_claiming_2000x2000x1000_fails_before_any_voxel_is_read(tmp_path):
    path = claimed(tmp_path / "huge.nii.gz", (2000, 2000, 1000), (0.2, 0.2, 0.2))
    start = time.perf_counter()
    with pytest.raises(SizeError) as info:
        preprocess_image(path, "ct")
    assert time.perf_counter() - start < 2.0
    message = one_line(info, path)
    assert "2000x2000x1000 = 4,000,000,000 voxels" in message and f"max_input_voxels {MAX_INPUT_VOXELS:,}" in message
    assert "data.preprocess.max_input_voxels (train.py) or inference.max_input_voxels (predict.py, eval.py)" in message


def test_predict_checks_the_header_before_reading(tmp_path):
    """Predictor.preprocess_input (predict and eval) runs the same guard before it reads the image."""
    path = claimed(tmp_path / "huge.nii.gz", (2000, 2000, 1000), (0.2, 0.2, 0.2))
    with pytest.raises(SizeError, match="max_input_voxels"):
        Predictor.preprocess_input(SimpleNamespace(preprocess=PreprocessConfig()), path, "ct")


def test_50mm_voxels_fail_on_the_resampled_grid_size(tmp_path, write_nifti):
    path = write_nifti("coarse.nii.gz", np.full((64, 64, 64), 50, np.int16), np.diag([50.0, 50.0, 50.0, 1.0]))
    with pytest.raises(SizeError) as info:
        preprocess_image(path, "ct")
    message = one_line(info, path)
    assert "64x64x64 voxels of 50x50x50 mm resample to 3151x3151x1051 = 10,435,169,851 voxels at 1x1x3 mm" in message
    assert "more than max_resampled_voxels 268,435,456" in message


def test_the_resampled_limit_is_the_configured_one(write_nifti):
    path = write_nifti("small.nii.gz", np.full((16, 16, 16), 50, np.int16))  # 1 mm: 16x16x6 at 1x1x3
    preprocess_image(path, "ct", {"max_resampled_voxels": 16 * 16 * 6})
    with pytest.raises(SizeError, match=r"16x16x6 = 1,536 voxels at 1x1x3 mm, more than max_resampled_voxels 1,535"):
        preprocess_image(path, "ct", {"max_resampled_voxels": 16 * 16 * 6 - 1})


def test_a_0_01mm_image_fails_naming_its_voxel_size_instead_of_coming_out_empty(tmp_path, write_nifti):
    path = write_nifti("tiny_voxels.nii.gz", np.full((64, 64, 64), 50, np.int16), np.diag([0.01, 0.01, 0.01, 1.0]))
    with pytest.raises(SizeError) as info:
        preprocess_image(path, "ct")
    message = one_line(info, path)
    assert "one voxel of 1x1x3 mm spans 100x100x300 of its 64x64x64 voxels of 0.01x0.01x0.01 mm" in message
    assert "field of view of 0.64x0.64x0.64 mm" in message and "max_downsampling 20" in message
    out, info_ = preprocess_image(path, "ct", {"max_downsampling": 1000})  # raised: runs (on a 2x2x1 grid)
    assert info_.resampled_shape == (2, 2, 1)


def test_a_real_ct_passes_and_the_guards_stay_out_of_cache_keys_and_checkpoints(tmp_path):
    check_image_size(claimed(tmp_path / "ct.nii.gz", (512, 512, 1000), (0.7, 0.7, 1.0)), PreprocessConfig())
    check_image_size(claimed(tmp_path / "ct1.nii.gz", (512, 512, 1000), (1.0, 1.0, 1.0)), PreprocessConfig())
    raised = PreprocessConfig.coerce({"max_input_voxels": 10**10, "max_downsampling": 50})
    assert raised.to_dict() == PreprocessConfig().to_dict() and "max_input_voxels" not in raised.to_dict()
    assert {"max_input_voxels", "max_resampled_voxels", "max_downsampling"} <= NEUTRAL_OPTIONS
    with pytest.raises(ValueError, match="must be > 0"):
        PreprocessConfig(max_resampled_voxels=0)

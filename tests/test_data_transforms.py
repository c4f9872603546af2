"""Preprocessing (SAT's recipe), its edge cases, and the inversion back to the original grid."""

from __future__ import annotations

import json
import logging
import pickle

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

import lorkd.data.transforms as transforms
from lorkd.data.image_reader import CaseError, reordered
from lorkd.data.manifest import Case
from lorkd.data.transforms import (
    InversionInfo,
    PreprocessConfig,
    group_above,
    invert_above,
    invert_group,
    invert_to_original,
    preprocess_case,
    preprocess_image,
    to_preprocessed_grid,
)

RAW = PreprocessConfig(orientation=None, spacing=None, crop_foreground=False)


def lps_affine(spacing, shape):
    """LPS-ordered axes (x to the left, y posterior), centred on the world origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [
        spacing[0] * (shape[0] - 1) / 2,
        spacing[1] * (shape[1] - 1) / 2,
        -spacing[2] * (shape[2] - 1) / 2,
    ]
    return affine


def world_of(affine, index):
    return (affine @ np.array([*index, 1.0]))[:3]


def make_case(tmp_path, write_nifti, image, labelmap, affine, labels, modality="ct", orientation=None):
    img = write_nifti("img.nii.gz", image, affine)
    seg = write_nifti("seg.nii.gz", labelmap.astype(np.uint8), affine)
    return Case(img, list(labels), modality, "D", seg, None, "c1", None, orientation, 1, tmp_path / "m.jsonl")


def test_lps_anisotropic_ct_becomes_ras_1x1x3_with_windowed_zscore(tmp_path, write_nifti):
    shape, spacing = (100, 90, 36), (0.8, 0.8, 2.5)
    affine = lps_affine(spacing, shape)
    image = np.full(shape, -1000.0, np.float32)  # air, cropped away (HU <= 0)
    image[10:90, 10:80, 4:32] = 40.0  # soft tissue: the foreground box
    image[20:40, 20:40, 8:20] = 3000.0  # metal: clipped to 1000
    image[50:80, 40:70, 10:28] = -800.0  # lung: clipped to -500
    marker_world = world_of(affine, (30, 30, 14))
    labelmap = np.zeros(shape, np.uint8)
    labelmap[20:40, 20:40, 8:20] = 1
    case = make_case(tmp_path, write_nifti, image, labelmap, affine, ["metal", "absent"])
    out = preprocess_case(case)
    info, img = out.info, out.image

    assert nib.aff2axcodes(info.affine) == ("R", "A", "S")
    assert np.allclose(np.abs(info.affine[:3, :3]), np.diag([1.0, 1.0, 3.0]))
    assert img.dtype == np.float32 and img.shape == (1, *info.shape)
    # the crop is the soft-tissue block: 80 x 70 x 28 voxels of 0.8/0.8/2.5 mm -> about 64 x 56 x 23
    assert np.allclose(info.shape, (64, 56, 23), atol=2)
    # intensities: z-score of the CT clipped to [-500, 1000]
    assert abs(img.mean()) < 1e-5 and abs(img.std() - 1) < 1e-4
    v_min, v_max = img.min(), img.max()
    centre = np.round(np.linalg.solve(info.affine, [*world_of(affine, (50, 20, 8)), 1.0])[:3]).astype(int)
    v_tissue = img[(0, *centre)]
    assert (v_max - v_tissue) / (v_tissue - v_min) == pytest.approx((1000 - 40) / (40 + 500), rel=1e-4)
    # the metal block is where it was in the world, and its mask came along (nearest)
    marker = np.round(np.linalg.solve(info.affine, [*marker_world, 1.0])[:3]).astype(int)
    assert img[(0, *marker)] == pytest.approx(v_max)
    assert out.masks.dtype == np.uint8 and out.masks.shape == (2, *info.shape)
    assert out.masks[(0, *marker)] == 1 and out.masks[1].sum() == 0
    assert out.masks[0].sum() == pytest.approx(20 * 20 * 12 * 0.8 * 0.8 * 2.5 / 3, rel=0.15)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("dtype", "to"), [(np.int16, np.float32), (np.uint8, None), (np.float32, None), (bool, np.uint8)])
def test_reordered_is_numpy_asarray_in_the_other_order(order, dtype, to):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((130, 70, 33)) * 100).astype(dtype)
    data[:, 40:] = 0  # whole zero blocks
    source = np.asfortranarray(data) if order == "C" else np.ascontiguousarray(data)  # from the other order
    expected = np.asarray(source, dtype=to, order=order)
    for threads in (1, 3):  # the blocks shared among threads: the same array
        out = reordered(source, order, to, threads)
        assert out.dtype == expected.dtype and out.flags[f"{order}_CONTIGUOUS"]
        assert np.array_equal(out, expected)
    assert reordered(expected, order) is expected  # in order already: no copy
    with pytest.raises(ValueError, match="3-D"):
        reordered(data[0], order)


def test_z_score_and_clipping_match_sat_formulas_exactly():
    rng = np.random.default_rng(0)
    image = rng.normal(300, 400, (20, 20, 10)).astype(np.float32)
    ct, _ = preprocess_image(image, "CT", RAW, affine=np.eye(4))
    clipped = np.clip(image, -500, 1000)
    assert np.allclose(ct[0], (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    mri, _ = preprocess_image(image, "T1", RAW, affine=np.eye(4))
    low, high = np.percentile(image, [0.5, 99.5])
    clipped = np.clip(image, low, high)
    assert np.allclose(mri[0], (clipped - clipped.mean()) / clipped.std(), atol=1e-5)


def test_orientation_override_from_the_case(tmp_path, write_nifti):
    image = np.ones((10, 12, 8), np.float32)
    case = make_case(
        tmp_path, write_nifti, image, np.zeros_like(image), np.eye(4), ["liver"], orientation="LPS"
    )
    out = preprocess_case(case, PreprocessConfig(spacing=None))
    assert out.info.orientation == "LPS" and nib.aff2axcodes(out.info.affine) == ("L", "P", "S")
    _, info = preprocess_image(image, "ct", PreprocessConfig(spacing=None), np.eye(4), orientation="asr")
    assert info.orientation == "ASR" and nib.aff2axcodes(info.affine) == ("A", "S", "R")
    with pytest.raises(ValueError, match="invalid orientation 'RRS'; expected 3 axis codes"):
        preprocess_image(image, "ct", PreprocessConfig(spacing=None), np.eye(4), orientation="RRS")


def test_all_background_ct_keeps_the_full_volume(caplog):
    image = np.full((30, 30, 12), -1000.0, np.float32)
    image[5:20, 5:20, 2:8] = -50.0
    with caplog.at_level(logging.WARNING):
        out, info = preprocess_image(image, "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    assert info.foreground_empty and info.shape == info.resampled_shape == (30, 30, 12)
    assert np.isfinite(out).all() and "keeping the full volume" in caplog.text


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_constant_image_gives_zeros_not_nan(modality):
    out, info = preprocess_image(np.full((12, 12, 6), 50.0, np.float32), modality, affine=np.eye(4))
    assert not info.foreground_empty and np.array_equal(out, np.zeros_like(out))


def test_nan_voxels_error_names_the_file_or_become_zero(write_nifti):
    image = np.ones((8, 8, 4), np.float32)
    image[1, 2, 3] = np.nan
    image[0, 0, 0] = np.inf
    path = write_nifti("nan_case.nii.gz", image)
    with pytest.raises(CaseError, match=r"nan_case.nii.gz: 2 NaN/Inf voxel\(s\)"):
        preprocess_image(path, "ct")
    out, _ = preprocess_image(path, "ct", {"nan_policy": "zero", "spacing": None})
    assert np.isfinite(out).all()


def test_4d_singleton_channel_is_squeezed_and_other_shapes_fail(write_nifti):
    image = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    out3, _ = preprocess_image(write_nifti("a.nii.gz", image), "mri", RAW)
    out4, _ = preprocess_image(write_nifti("b.nii.gz", image[..., None]), "mri", RAW)
    assert np.array_equal(out3, out4)
    with pytest.raises(CaseError, match=r"two_channels.nii.gz: expected a 3-D volume .* \(8, 8, 4, 2\)"):
        preprocess_image(write_nifti("two_channels.nii.gz", np.stack([image, image], -1)), "mri")
    with pytest.raises(ValueError, match="needs its affine"):
        preprocess_image(image, "mri")


def blob_labelmap(shape, spacing, affine):
    """Three ellipsoids defined in world mm, so the same anatomy on any grid."""
    idx = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)
    labelmap = np.zeros(shape, np.uint8)
    for lab, (c, r) in enumerate(
        [((-12, 5, 0), (14, 10, 18)), ((15, -8, 6), (8, 12, 12)), ((0, 0, -15), (20, 18, 9))], 1
    ):
        inside = sum(((world[a] - c[a]) / r[a]) ** 2 for a in range(3)) <= 1
        labelmap[inside] = lab
    return labelmap


def rotation_z(degrees):
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def grid(spacing, shape, rotation=np.eye(3), flip=(1, 1, 1)):
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.multiply(spacing, flip))
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


ROUND_TRIPS = {
    # name: (affine, shape, exact)
    "ras_1x1x3": (grid((1, 1, 3), (70, 60, 24)), (70, 60, 24), True),
    "lps_1x1x3": (grid((1, 1, 3), (70, 60, 24), flip=(-1, -1, 1)), (70, 60, 24), True),
    "lps_anisotropic": (grid((0.8, 0.8, 2.5), (88, 76, 28), flip=(-1, -1, 1)), (88, 76, 28), False),
    "ras_fine": (grid((0.7, 0.9, 1.5), (100, 66, 48)), (100, 66, 48), False),
    "oblique": (grid((1.1, 1.1, 2.0), (70, 60, 36), rotation=rotation_z(20)), (70, 60, 36), False),
    "axial_permuted": (grid((1, 1, 3), (70, 24, 60))[:, [0, 2, 1, 3]], (70, 60, 24), False),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_masks_round_trip_to_the_original_grid(tmp_path, write_nifti, name):
    affine, shape, exact = ROUND_TRIPS[name]
    labelmap = blob_labelmap(shape, None, affine)
    image = np.where(labelmap > 0, 100.0, 20.0).astype(np.float32)  # all > 0: crop keeps everything
    image[:3] = 0.0  # except a zero border slab, so the crop removes something
    case = make_case(tmp_path, write_nifti, image, labelmap, affine, ["a", "b", "c"], modality="mri")
    out = preprocess_case(case)
    back = invert_to_original(out.masks, out.info, mode="nearest")
    assert back.shape == (3, *shape) and back.dtype == np.uint8
    for j in range(3):
        truth = labelmap == j + 1
        dice = 2 * np.logical_and(back[j], truth).sum() / (back[j].sum() + truth.sum())
        if exact:
            assert np.array_equal(back[j].astype(bool), truth), name
        else:
            assert dice > 0.93, (name, j, dice)


def test_inversion_pads_the_crop_with_zero_and_returns_float_for_bilinear():
    image = np.zeros((40, 40, 20), np.float32)
    image[10:30, 5:25, 4:16] = 100.0
    out, info = preprocess_image(image, "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    assert info.crop_start == (10, 5, 4) and info.crop_end == (30, 25, 16)
    probs = np.full((2, *info.shape), 0.75, np.float32)
    back = invert_to_original(probs, info, mode="bilinear")
    assert back.dtype == np.float32 and back.shape == (2, 40, 40, 20)
    assert np.allclose(back[:, 10:30, 5:25, 4:16], 0.75) and back.sum() == pytest.approx(
        0.75 * 2 * 20 * 20 * 12
    )
    with pytest.raises(ValueError, match="preprocessed grid"):
        invert_to_original(np.zeros((1, 5, 5, 5)), info)


def test_labels_share_a_sampling_only_where_it_costs_less_and_their_values_are_the_whole_mappings():
    image = np.zeros((60, 40, 20), np.float32)
    image[2:58, 2:38, 1:19] = 100.0
    _, info = preprocess_image(image, "ct", affine=np.diag([0.8, 0.9, 2.5, 1.0]))  # resampled: boxes are boxes
    maps = np.zeros((5, *info.shape), np.float32)
    maps[0, 5:20, 5:20, 2:5] = 0.9  # near one end
    maps[1, 9:24, 5:20, 2:5] = 0.9  # most of the same box: joins label 0
    maps[2, 40:55, 20:35, 2:5] = 0.9  # far away: its own sampling
    maps[4, 41:54, 21:34, 2:5] = 0.8  # label 3 between is empty: label 4 starts again
    groups = group_above(maps, info, 0.5, max_labels=4)
    assert [g.indices for g in groups] == [(0, 1), (2,), (3,), (4,)]
    assert groups[1].support is not None and groups[2].support is None
    assert [g.indices for g in group_above(maps[[0, 1, 0, 1]], info, 0.5, max_labels=3)] == [(0, 1, 2), (3,)]
    whole = invert_to_original(maps, info)
    for group in groups:
        sampled = np.zeros(whole.shape[1:], dtype=int)  # how often each voxel came in a slab
        for box, values in invert_group(maps[list(group.indices)], info, group.support):
            assert values.shape[0] == len(group.indices)
            sampled[box] += 1
            for index, label_values in zip(group.indices, values):
                np.testing.assert_array_equal(label_values, whole[index][box])  # the same floats in the box
        assert sampled.max() <= 1  # slabs do not overlap
        assert group.support is None or 0 < sampled.sum() < sampled.size / 4  # sampled in a box, not everywhere
        for index in group.indices:
            assert whole[index][sampled == 0].max() < 0.5 - 1e-4  # and nothing near the threshold outside it
    assert list(invert_group(maps[[3]], info, None)) == []


def test_maps_already_in_the_grid_before_the_crop_go_back_to_the_same_slabs():
    """``invert_above`` takes maps on the grid before the crop (0 outside it, as ``predict`` blends them)
    as well as on the cropped grid: the same groups, slabs and floats."""
    image = np.zeros((60, 40, 20), np.float32)
    image[8:50, 5:36, 2:18] = 100.0
    _, info = preprocess_image(image, "ct", affine=np.diag([0.8, 0.9, 2.5, 1.0]))
    assert info.shape != info.resampled_shape  # a real crop
    maps = np.zeros((3, *info.shape), np.float32)
    maps[0, 5:20, 5:20, 2:5] = 0.9
    maps[1, 9:24, 5:20, 2:5] = 0.8
    maps[2] = 0.7  # the whole crop
    full = np.zeros((3, *info.resampled_shape), np.float32)
    full[(slice(None), *info.crop_slices)] = maps
    assert transforms._uncropped(full, info) is full  # sampled as it is: no copy
    cropped, uncropped = list(invert_above(maps, info, 0.5, 2)), list(invert_above(full, info, 0.5, 2))
    assert [(i, b) for i, b, _ in cropped] == [(i, b) for i, b, _ in uncropped] and len(cropped) >= 2
    for (_, _, a), (_, _, b) in zip(cropped, uncropped):
        np.testing.assert_array_equal(a, b)


def test_crop_margin_keeps_background_around_the_body_and_still_inverts():
    image = np.zeros((40, 40, 20), np.float32)
    image[10:30, 5:25, 4:16] = 100.0
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    out, info = preprocess_image(image, "ct", {"crop_margin_mm": 6.0}, affine=affine)
    # 6 voxels of 1 mm, 2 of 3 mm, clipped where the scan ends (y starts at 5)
    assert info.crop_start == (4, 0, 2) and info.crop_end == (36, 31, 18)
    background = float(out.min())
    assert np.all(out[0, :6] == background) and np.all(out[0, :, :, :2] == background)  # real background kept
    assert np.all(out[0, 6:26, 5:25, 2:14] > background)  # the body, where it was
    probs = np.zeros((1, *info.shape), np.float32)
    probs[0, 6:26, 5:25, 2:14] = 1.0
    back = invert_to_original(probs, info, mode="nearest")
    assert np.array_equal(back[0] > 0, image > 0)
    with pytest.raises(ValueError, match="crop_margin_mm"):
        PreprocessConfig(crop_margin_mm=-1)


def test_inversion_info_is_picklable_and_json_round_trips():
    _, info = preprocess_image(np.ones((9, 8, 7), np.float32), "ct", affine=grid((0.8, 0.8, 2.5), (9, 8, 7)))
    assert pickle.loads(pickle.dumps(info)) == info
    assert InversionInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    grid_mask = to_preprocessed_grid(np.ones((1, 9, 8, 7), np.float32), info)
    assert grid_mask.shape == (1, *info.shape)


def test_preprocess_config_from_hydra_and_validation():
    cfg = PreprocessConfig.coerce(
        OmegaConf.create({"spacing": [1, 1, 2], "orientation": "lps", "ct_window": [-100, 200]})
    )
    assert cfg.spacing == (1.0, 1.0, 2.0) and cfg.orientation == "LPS" and cfg.ct_window == (-100.0, 200.0)
    assert PreprocessConfig.coerce(None) == PreprocessConfig()
    for bad in (
        {"spacing": [1, 1]},
        {"orientation": "XYZ"},
        {"ct_window": [5, 1]},
        {"nan_policy": "drop"},
        {"foo": 1},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig.coerce(bad)

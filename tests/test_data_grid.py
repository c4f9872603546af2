"""``lorkd.data.grid`` reproduces MONAI's ``Orientation`` + ``Spacing`` grid and ``SpatialResample`` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorkd.data import grid
from lorkd.data.transforms import PreprocessConfig, invert_to_original, preprocess_image, to_preprocessed_grid

monai_data = pytest.importorskip("monai.data")
monai_transforms = pytest.importorskip("monai.transforms")


def monai_target_grid(shape, affine, orientation, spacing):
    t = monai_data.MetaTensor(torch.empty((1, *shape)), affine=torch.as_tensor(affine, dtype=torch.float64))
    if orientation:
        t = monai_transforms.Orientation(axcodes=orientation, labels=grid.AXIS_LABELS, lazy=True)(t)
    if spacing is not None:
        t = monai_transforms.Spacing(pixdim=tuple(spacing), lazy=True)(t)
    return np.asarray(t.peek_pending_affine(), dtype=np.float64), tuple(int(s) for s in t.peek_pending_shape())


def monai_resample(array, src_affine, dst_affine, dst_shape, mode, support=None, within=None):
    """MONAI's SpatialResample (``support`` and ``within`` are ours alone: MONAI samples every output voxel)."""
    src = monai_data.MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
        affine=torch.as_tensor(src_affine, dtype=torch.float64),
    )
    out = monai_transforms.SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=tuple(dst_shape)
    )
    out = np.asarray(out.as_tensor() if isinstance(out, monai_data.MetaTensor) else out, dtype=np.float32)
    return out if within is None else out[(slice(None), *within)]


def oblique(angles_deg, spacing, origin):
    """Affine rotated about x, y, z by ``angles_deg`` with voxel sizes ``spacing``."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def permuted(order, signs, spacing):
    affine = np.zeros((4, 4))
    for src, (dst, sign, size) in enumerate(zip(order, signs, spacing)):
        affine[dst, src] = sign * size
    affine[:3, 3] = [7.5, -3.25, 12.0]
    affine[3, 3] = 1.0
    return affine


GRIDS = {
    "identity": ((20, 17, 9), np.eye(4), None, None),
    "identity-ras-1mm": ((20, 17, 9), np.eye(4), "RAS", (1.0, 1.0, 1.0)),
    "lps-to-ras-ct": ((41, 37, 13), np.diag([-0.8, -0.8, 2.5, 1.0]), "RAS", (1.0, 1.0, 3.0)),
    "ras-to-pli-upsample": ((21, 16, 7), np.diag([0.7, 1.3, 2.0, 1.0]), "PLI", (0.5, 1.0, 1.0)),
    "permuted-axes-downsample": ((19, 14, 23), permuted((2, 0, 1), (1, -1, -1), (1.5, 0.9, 2.2)), "RAS", (2, 2, 3)),
    "flips-only": ((11, 12, 13), np.diag([-1.0, -1.0, -1.0, 1.0]), "RAS", None),
    "spacing-only": ((11, 12, 13), np.diag([1.1, 0.6, 3.3, 1.0]), None, (1.0, 1.0, 3.0)),
    "spacing-within-1e-3-kept": ((11, 12, 13), np.diag([1.0004, 1.0, 2.9995, 1.0]), "RAS", (1.0, 1.0, 3.0)),
    "thin-z": ((15, 12, 1), np.diag([1.0, 1.0, 3.0, 1.0]), "RAS", (1.0, 1.0, 3.0)),
    "thin-x-upsampled": ((1, 12, 10), np.diag([-2.0, 1.0, 3.0, 1.0]), "RAS", (0.5, 1.0, 3.0)),
    "odd-shape-anisotropic": ((33, 7, 5), np.diag([0.45, 2.7, 4.9, 1.0]), "LPS", (1.3, 1.7, 2.9)),
    "oblique": ((19, 23, 11), oblique((10, -20, 35), (0.9, 1.1, 2.2), (5, -3, 7)), "RAS", (1.0, 1.5, 2.0)),
    "oblique-spacing-only": ((19, 23, 11), oblique((3, 4, -50), (0.9, 1.1, 2.2), (0, 0, 0)), None, (1, 1, 1)),
    "oblique-orientation-only": ((19, 23, 11), oblique((170, 5, 80), (1.0, 1.0, 1.0), (1, 2, 3)), "LPS", None),
}


@pytest.fixture(params=sorted(GRIDS))
def case(request):
    shape, affine, orientation, spacing = GRIDS[request.param]
    return shape, np.asarray(affine, dtype=np.float64), orientation, spacing


def test_target_grid_equals_monai_exactly(case):
    shape, affine, orientation, spacing = case
    ours_affine, ours_shape = grid.target_grid(shape, affine, orientation, spacing)
    monai_affine, monai_shape = monai_target_grid(shape, affine, orientation, spacing)
    assert ours_shape == monai_shape
    np.testing.assert_array_equal(ours_affine, monai_affine)


@pytest.mark.parametrize("mode", grid.MODES)
def test_resample_forward_and_back_equals_monai(case, mode, monkeypatch):
    monkeypatch.setattr(grid, "SLAB_VOXELS", 97)  # several slabs, one not a whole number of planes
    shape, affine, orientation, spacing = case
    dst_affine, dst_shape = grid.target_grid(shape, affine, orientation, spacing)
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(2, *shape)) * 300).astype(np.float32)  # CT-like magnitudes, 2 channels
    ours = grid.resample(array, affine, dst_affine, dst_shape, mode)
    theirs = monai_resample(array, affine, dst_affine, dst_shape, mode)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (2, *dst_shape)
    np.testing.assert_array_equal(ours, theirs)  # same float32 steps: identical, nearest ties included
    back = grid.resample(ours, dst_affine, affine, shape, mode)
    np.testing.assert_array_equal(back, monai_resample(theirs, dst_affine, affine, shape, mode))


def test_resample_one_slab_equals_many(monkeypatch):
    shape, affine, orientation, spacing = GRIDS["oblique"]
    dst_affine, dst_shape = grid.target_grid(shape, affine, orientation, spacing)
    array = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    whole = grid.resample(array, affine, dst_affine, dst_shape, "bilinear")
    monkeypatch.setattr(grid, "SLAB_VOXELS", 1)  # one output plane per slab
    np.testing.assert_array_equal(grid.resample(array, affine, dst_affine, dst_shape, "bilinear"), whole)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_rows_spread_over_threads_give_the_same_voxels(threads, monkeypatch):
    """The rows of a slab go to grid_sample as a batch of one part per thread (uneven counts included)."""
    shape, affine, orientation, spacing = GRIDS["oblique"]
    dst_affine, dst_shape = grid.target_grid(shape, affine, orientation, spacing)
    array = np.random.default_rng(2).normal(size=(2, *shape)).astype(np.float32)
    monkeypatch.setattr(grid, "SLAB_VOXELS", 7 * dst_shape[1] * dst_shape[2])  # 7 rows a slab: never even
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grid.resample(array, affine, dst_affine, dst_shape, "bilinear")
        torch.set_num_threads(threads)
        many = grid.resample(array, affine, dst_affine, dst_shape, "bilinear")
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(many, one)
    np.testing.assert_array_equal(many, monai_resample(array, affine, dst_affine, dst_shape, "bilinear"))


@pytest.mark.parametrize("mode", grid.MODES)
def test_sampling_only_where_a_crop_can_reach_changes_no_voxel(case, mode):
    """``support`` (the crop inside its grid, zero elsewhere) skips output voxels that read only zeros:
    identical outputs, for interior crops and crops on the grid's faces, in both directions."""
    shape, affine, orientation, spacing = case
    dst_affine, dst_shape = grid.target_grid(shape, affine, orientation, spacing)
    rng = np.random.default_rng(3)
    for src_affine, src_shape, dst, out_shape in ((dst_affine, dst_shape, affine, shape), (affine, shape, dst_affine, dst_shape)):
        for touching in (False, True):
            lo = [0 if touching or n < 3 else int(rng.integers(1, n // 2)) for n in src_shape]
            hi = [n if touching and i == 1 else max(lo[i] + 1, n - int(rng.integers(0, max(1, n // 3)))) for i, n in enumerate(src_shape)]
            support = tuple(slice(a, b) for a, b in zip(lo, hi))
            array = np.zeros((2, *src_shape), np.float32)
            array[(slice(None), *support)] = rng.random((2, *(b - a for a, b in zip(lo, hi))), dtype=np.float32) + 0.5
            full = grid.resample(array, src_affine, dst, out_shape, mode)
            skipped = grid.resample(array, src_affine, dst, out_shape, mode, support=support)
            np.testing.assert_array_equal(skipped, full)
            assert full.any()


@pytest.mark.parametrize("slab_voxels", [1, 50, 1 << 22])
def test_slabs_tile_the_reach_of_a_crop_with_resamples_values(case, slab_voxels, monkeypatch):
    """``resample_slabs``: disjoint slabs, each with ``resample``'s floats; every voxel outside them is 0
    (it reads only zeros); a slab's values and coordinates stay within SLAB_VOXELS voxels' coordinates.
    Grids that agree give one slab, the array itself."""
    shape, affine, orientation, spacing = case
    dst_affine, dst_shape = grid.target_grid(shape, affine, orientation, spacing)
    agree = tuple(dst_shape) == tuple(shape) and np.allclose(dst_affine, affine, atol=grid.AFFINE_TOL)
    monkeypatch.setattr(grid, "SLAB_VOXELS", slab_voxels)
    support = tuple(slice(n // 4, max(n // 4 + 1, n - n // 3)) for n in dst_shape)
    array = np.zeros((3, *dst_shape), np.float32)
    array[(slice(None), *support)] = np.random.default_rng(5).random((3, *(s.stop - s.start for s in support)), dtype=np.float32) + 0.5
    full = grid.resample(array, dst_affine, affine, shape, "bilinear")
    covered = np.zeros(shape, dtype=int)
    slabs = 0
    for box, values in grid.resample_slabs(array, dst_affine, affine, shape, "bilinear", support):
        np.testing.assert_array_equal(values, full[(slice(None), *box)])
        covered[box] += 1
        slabs += 1
        # a slab takes one row of the box at least
        assert agree or values.shape[1] == 1 or values[0].size * (3 + len(values)) <= 3 * slab_voxels
    assert covered.max() == 1 and not full[:, covered == 0].any() and full.any()
    rows = np.count_nonzero(covered.any(axis=(1, 2)))
    if agree:
        assert slabs == 1
    elif slab_voxels < 1 << 22:
        assert slabs > 1 or rows == 1
    else:  # one slab, in a part per thread (and one for the rows left over)
        assert slabs <= torch.get_num_threads() + 1


def test_the_reach_of_a_small_crop_is_a_small_box():
    xform = np.diag([0.8, 0.8, 2.5 / 3, 1.0])  # CT voxels (0.8, 0.8, 2.5 mm) read from a 1x1x3 mm grid
    box = grid._reach(xform, (100, 100, 40), (slice(40, 60), slice(0, 100), slice(10, 20)), (125, 125, 48))
    assert box[1] == slice(0, 125)  # a crop on both faces of an axis reaches everything along it
    assert box[0].start >= 45 and box[0].stop <= 80 and box[2].start >= 8 and box[2].stop <= 28
    assert grid._reach(oblique((10, 0, 0), (1, 1, 1), (0, 0, 0)), (9, 9, 9), (slice(2, 4),) * 3, (9, 9, 9)) is None


def test_same_grid_returns_the_array_and_bad_input_is_named():
    array = np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4)
    out = grid.resample(array, np.eye(4), np.eye(4) + 1e-4 * np.eye(4), (2, 3, 4), "nearest")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, array)
    with pytest.raises(ValueError, match="mode must be one of"):
        grid.resample(array, np.eye(4), np.eye(4), (2, 3, 4), "cubic")
    with pytest.raises(ValueError, match="not invertible"):
        grid.resample(array, np.zeros((4, 4)), np.eye(4), (2, 3, 4), "nearest")
    box = (slice(0, 1), slice(1, 3), slice(0, 4))
    with pytest.raises(ValueError, match="support or within"):
        grid.resample(array, np.eye(4), np.eye(4), (2, 3, 4), "nearest", support=box, within=box)
    np.testing.assert_array_equal(grid.resample(array, np.eye(4), np.eye(4), (2, 3, 4), "nearest", within=box), array[(slice(None), *box)])


@pytest.mark.parametrize("content", ["body", "on the faces", "one voxel", "nothing"])
@pytest.mark.parametrize("margin", [0.0, 2.5])
def test_resampling_only_the_reach_of_the_foreground_crops_the_same(case, content, margin, monkeypatch):
    """preprocess_image resamples only the box that reads the voxels > 0 (and the crop's margin): the same
    array and InversionInfo as resampling the whole grid and cropping it."""
    import lorkd.data.transforms as transforms

    shape, affine, orientation, spacing = case
    image = np.full(shape, -1000.0, np.float32)  # air
    inner = tuple(slice(n // 4, max(n // 4 + 1, n - n // 3)) for n in shape)
    if content == "body":
        image[inner] = np.random.default_rng(4).normal(60, 30, [s.stop - s.start for s in inner])
    elif content == "on the faces":
        image[:, : shape[1] // 2] = 40.0
        image[-1] = 80.0
    elif content == "one voxel":
        image[tuple(s.start for s in inner)] = 500.0
    cfg = PreprocessConfig(orientation=orientation, spacing=spacing, crop_margin_mm=margin)
    ours, ours_info = preprocess_image(image, "ct", cfg, affine=affine)
    monkeypatch.setattr(transforms, "reach", lambda *args, **kwargs: None)  # the whole grid, then the crop
    whole, whole_info = preprocess_image(image, "ct", cfg, affine=affine)
    np.testing.assert_array_equal(ours, whole)
    assert ours_info == whole_info


def test_a_voxel_no_resampled_voxel_reads_leaves_the_whole_volume(monkeypatch):
    """Downsampled 3x, a source voxel between two sampled ones has weight 0: nothing > 0 after
    resampling although the source has a voxel > 0, so the whole volume is kept (not the reach's box)."""
    import lorkd.data.transforms as transforms

    image = np.full((30, 30, 30), -1000.0, np.float32)
    image[14, 14, 14] = 500.0
    cfg = PreprocessConfig(orientation=None, spacing=(3.0, 3.0, 3.0))
    out, info = preprocess_image(image, "ct", cfg, affine=np.eye(4))
    assert info.foreground_empty and out.shape[1:] == info.resampled_shape == (11, 11, 11)
    monkeypatch.setattr(transforms, "reach", lambda *args, **kwargs: None)
    np.testing.assert_array_equal(preprocess_image(image, "ct", cfg, affine=np.eye(4))[0], out)


def test_preprocessing_round_trips_equal_monai(monkeypatch):
    """The whole preprocess -> to_preprocessed_grid / invert_to_original chain, ours vs MONAI's resampling."""
    shape, affine, _, _ = GRIDS["oblique"]
    rng = np.random.default_rng(2)
    image = rng.normal(40, 200, size=shape).astype(np.float32)
    labels = (rng.random((1, *shape)) > 0.7).astype(np.float32)
    cfg = PreprocessConfig(crop_margin_mm=2.0)

    def run():
        volume, info = preprocess_image(image, "ct", cfg, affine=affine)
        probs = np.clip(volume, 0, 1)
        return (
            volume,
            to_preprocessed_grid(labels, info, "nearest"),
            invert_to_original(probs, info, "bilinear"),
            invert_to_original((probs > 0.5).astype(np.uint8), info, "nearest"),
        )

    ours = run()
    import lorkd.data.transforms as transforms

    monkeypatch.setattr(transforms, "target_grid", monai_target_grid)
    monkeypatch.setattr(transforms, "resample", monai_resample)
    for a, b in zip(ours, run()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

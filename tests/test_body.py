"""The scan's background value in normalised space and the body mask built on it."""

from __future__ import annotations

import numpy as np
import pytest

from lorkd.data.body import body_mask
from lorkd.data.transforms import PreprocessConfig, preprocess_image

RAW = PreprocessConfig(orientation=None, spacing=None, crop_foreground=False)


def head(shape=(30, 30, 6)) -> np.ndarray:
    """Zero background, a skull ring (dark inside: 0 like the background) around a bright brain."""
    image = np.zeros(shape, np.float32)
    x, y = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(x - 15, y - 15)
    image[(r >= 9) & (r < 11)] = 300.0
    image[r < 6] = 600.0
    return image


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_background_is_the_normalised_clip_bound_bit_for_bit(modality):
    image = head() - (1000.0 if modality == "ct" else 0.0)  # CT: air at -1000 HU, clipped to -500
    out, info = preprocess_image(image, modality, RAW, affine=np.eye(4))
    assert info.background == float(out.min()) < 0.0  # 0 is the mean intensity, not the background
    assert np.array_equal(out[0] == info.background, image <= (-500.0 if modality == "ct" else 0.0))


def test_a_ct_without_air_has_its_background_below_every_voxel():
    image = np.full((12, 12, 6), 50.0, np.float32)  # soft tissue everywhere: nothing at -500 HU
    image[3:8, 3:8, 2:4] = 800.0
    out, info = preprocess_image(image, "ct", RAW, affine=np.eye(4))
    assert info.background < float(out.min())
    assert body_mask(out[0], info.background).all()


def test_body_fills_holes_per_slice_and_grows_by_the_margin_per_axis():
    image = head()
    image[:, :, 0] = 0.0  # an empty slice: no body there of its own
    body = body_mask(image, 0.0)
    x, y = np.mgrid[:30, :30]
    inside_skull = np.hypot(x - 15, y - 15) < 11
    assert np.array_equal(body[:, :, 1], inside_skull)  # the dark gap between skull and brain is filled
    assert not body[:, :, 0].any()
    grown = body_mask(image, 0.0, margin=(2, 0, 1))
    assert grown[:, :, 0].any() and np.array_equal(grown[:, :, 0], grown[:, :, 1])  # one slice below
    row = grown[:, 15, 3]
    assert np.flatnonzero(row).tolist() == list(range(15 - 10 - 2, 15 + 10 + 3))  # 2 voxels along x
    assert np.array_equal(grown[15, :, 3], inside_skull[15])  # none along y


def test_body_mask_rejects_a_channel_axis():
    with pytest.raises(ValueError, match="expects an"):
        body_mask(np.zeros((1, 4, 4, 4)), 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_holes_are_filled_as_binary_fill_holes_fills_each_slice(seed):
    """Random blobs with holes, touching the edges or not, a slice of one row: the same mask as scipy's
    ``binary_fill_holes`` slice by slice (4-connected background)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(seed)
    shape = [(23, 19, 5), (17, 1, 4), (9, 9, 1), (30, 28, 3)][seed]
    image = ndimage.uniform_filter(rng.random(shape), size=(3, 3, 1)).astype(np.float32)
    expected = np.stack([ndimage.binary_fill_holes(image[:, :, z] > 0.5) for z in range(shape[2])], axis=2)
    body = body_mask(image, 0.5)
    assert np.array_equal(body, expected)
    assert seed in (1, 2) or (expected & ~(image > 0.5)).any()  # holes were filled (not in the small ones)

"""Dice / NSD against independent references (MONAI, brute force) and hand-made cases."""

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from lorkd.evaluation.metrics import (
    _CORNERS,
    _corner_bit,
    case_label_metrics,
    confusion_counts,
    dice,
    nsd,
    surface_distances,
    surfel_area_table,
    tolerance_for,
)

SPACINGS = [(1.0, 1.0, 3.0), (0.8, 1.3, 2.5)]


@pytest.fixture(scope="module")
def monai_metrics():
    """MONAI's DeepMind-compatible surface Dice and its copy of DeepMind's surfel table (slow import)."""
    surface_dice = pytest.importorskip("monai.metrics.surface_dice")
    utils = pytest.importorskip("monai.metrics.utils")
    return surface_dice.compute_surface_dice, utils.create_table_neighbour_code_to_surface_area


def blobs(seed: int, shape=(22, 18, 9), level: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated smooth random masks, some touching the array border."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    scale = base.std()
    return base > level * scale, base + 0.5 * scale * noise / noise.std() > level * scale


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def monai_nsd(compute_surface_dice, pred, ref, spacing, tolerance) -> float:
    """MONAI's NSD for one binary mask pair: batch and channel axes of 1, the channel counted as a class."""
    import torch

    as_onehot = lambda m: torch.from_numpy(m)[None, None].float()  # noqa: E731
    value = compute_surface_dice(
        as_onehot(pred),
        as_onehot(ref),
        [tolerance],
        include_background=True,
        spacing=spacing,
        use_subvoxels=True,
    )
    return float(value[0, 0])


def brute_force_surfels(create_table, mask, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Surfel positions (mm) and areas by DeepMind's layout on the whole padded array, with MONAI's table copy."""
    table = create_table(spacing)[0].numpy().astype(float)
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    code = ndimage.correlate(np.pad(mask, 1).astype(int), kernel, mode="constant", origin=-1)[:-1, :-1, :-1]
    border = (code != 0) & (code != 255)
    return np.argwhere(border) * np.asarray(spacing), table[code[border]]


def brute_force_nsd(create_table, pred, ref, spacing, tolerance) -> float:
    """DeepMind's surface Dice with all-pairs distances and no cropping."""
    (p, area_p), (r, area_r) = (brute_force_surfels(create_table, m, spacing) for m in (pred, ref))
    pairs = cdist(p, r)
    within = area_p[pairs.min(1) <= tolerance].sum() + area_r[pairs.min(0) <= tolerance].sum()
    return within / (area_p.sum() + area_r.sum())


# --------------------------------------------------------------------------- Dice and counts


def test_confusion_counts_and_dice():
    pred, ref = box((6, 6, 6), (0, 0, 0), (4, 4, 4)), box((6, 6, 6), (2, 0, 0), (6, 4, 4))
    assert confusion_counts(pred, ref) == (32, 32, 32)
    assert dice(32, 32, 32) == 0.5
    a, b = blobs(0)
    tp, fp, fn = confusion_counts(a, b)
    assert dice(tp, fp, fn) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(a, b[:-1])


@pytest.mark.parametrize(
    ("n_pred", "n_ref", "sat", "nnunet"),
    [(0, 0, 1.0, math.nan), (5, 0, 0.0, math.nan), (0, 5, 0.0, 0.0)],
)
def test_empty_rules(n_pred, n_ref, sat, nnunet):
    pred = box((8, 8, 4), (0, 0, 0), (n_pred, 1, 1))
    ref = box((8, 8, 4), (0, 5, 3), (n_ref, 6, 4))
    for rule, expected in (("sat", sat), ("nnunet", nnunet)):
        m = case_label_metrics(pred, ref, (1, 1, 3), empty_rule=rule)
        assert (m["n_pred"], m["n_ref"], m["tp"], m["fp"], m["fn"]) == (n_pred, n_ref, 0, n_pred, n_ref)
        for value in (m["dice"], m["nsd"], nsd(pred, ref, (1, 1, 3), 1.0, rule)):
            assert value == expected or (math.isnan(value) and math.isnan(expected))


def test_unknown_empty_rule_is_rejected():
    with pytest.raises(ValueError, match="empty_rule"):
        dice(1, 0, 0, empty_rule="monai")


# --------------------------------------------------------------------------- NSD vs references


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), *SPACINGS, (2.0, 0.6, 1.1)])
def test_surfel_table_is_deepminds(monai_metrics, spacing):
    _, create_table = monai_metrics
    theirs = create_table(spacing)[0].numpy()
    to_their_code = [
        sum(128 >> _corner_bit(c) for c in _CORNERS if code >> _corner_bit(c) & 1) for code in range(256)
    ]
    np.testing.assert_allclose(surfel_area_table(spacing), theirs[to_their_code], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("seed", "spacing"), list(itertools.product(range(3), SPACINGS)))
def test_nsd_matches_monai_and_brute_force(monai_metrics, seed, spacing):
    compute_surface_dice, create_table = monai_metrics
    pred, ref = blobs(seed)
    for tolerance in (1.0, 2.0):
        ours = nsd(pred, ref, spacing, tolerance)
        assert 0.0 < ours < 1.0
        assert ours == pytest.approx(monai_nsd(compute_surface_dice, pred, ref, spacing, tolerance), abs=1e-6)
        assert ours == pytest.approx(brute_force_nsd(create_table, pred, ref, spacing, tolerance), abs=1e-6)


def test_surface_distances_match_all_pairs(monai_metrics):
    _, create_table = monai_metrics
    pred, ref = blobs(7)
    spacing = SPACINGS[1]
    d_pred, a_pred, d_ref, a_ref = surface_distances(pred, ref, spacing)
    (p, area_p), (r, area_r) = (brute_force_surfels(create_table, m, spacing) for m in (pred, ref))
    pairs = cdist(p, r)
    np.testing.assert_allclose(d_pred, pairs.min(1), rtol=1e-12)
    np.testing.assert_allclose(d_ref, pairs.min(0), rtol=1e-12)
    np.testing.assert_allclose(a_pred, area_p, rtol=1e-6)
    np.testing.assert_allclose(a_ref, area_r, rtol=1e-6)
    bounded = surface_distances(pred, ref, spacing, max_distance=1.5)[0]
    np.testing.assert_array_equal(bounded, np.where(d_pred <= 1.5, d_pred, np.inf))
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(pred, np.zeros_like(ref), spacing)


def test_crop_does_not_change_nsd():
    pred, ref = blobs(3, level=0.6)
    small = nsd(pred, ref, SPACINGS[1], 1.0)
    big_pred, big_ref = np.zeros((90, 70, 40), bool), np.zeros((90, 70, 40), bool)
    big_pred[50:72, 10:28, 20:29], big_ref[50:72, 10:28, 20:29] = pred, ref
    assert nsd(big_pred, big_ref, SPACINGS[1], 1.0) == pytest.approx(small, abs=1e-12)


# --------------------------------------------------------------------------- hand-made cases


def test_identical_and_disjoint():
    a = box((20, 20, 20), (2, 2, 2), (7, 8, 6))
    assert case_label_metrics(a, a, (1, 1, 3))["dice"] == 1.0
    assert nsd(a, a, (1, 1, 3), 1.0) == 1.0
    far = box((20, 20, 20), (12, 12, 12), (18, 18, 18))
    m = case_label_metrics(a, far, (1, 1, 3))
    assert (m["dice"], m["nsd"], m["tp"], m["fp"], m["fn"]) == (0.0, 0.0, 0, 120, 216)


def test_one_voxel_shift_along_1mm_vs_3mm_axis(monai_metrics):
    """A 1 mm shift stays within tolerance 1 mm everywhere; a 3 mm (one-slice) shift does not."""
    compute_surface_dice, _ = monai_metrics
    spacing, ref = (1.0, 1.0, 3.0), box((14, 14, 14), (4, 4, 4), (10, 10, 10))
    in_plane, through_plane = np.roll(ref, 1, axis=0), np.roll(ref, 1, axis=2)
    assert (
        dice(*confusion_counts(in_plane, ref))
        == dice(*confusion_counts(through_plane, ref))
        == pytest.approx(5 / 6)
    )
    assert nsd(in_plane, ref, spacing, 1.0) == 1.0
    assert nsd(in_plane, ref, spacing, 0.99) < 1.0
    shifted = nsd(through_plane, ref, spacing, 1.0)
    assert shifted == pytest.approx(
        0.852614, abs=1e-6
    )  # in-plane side faces still match, the 3 mm caps do not
    assert shifted == pytest.approx(
        monai_nsd(compute_surface_dice, through_plane, ref, spacing, 1.0), abs=1e-6
    )
    assert nsd(through_plane, ref, spacing, 3.0) == 1.0
    assert [case_label_metrics(through_plane, ref, spacing, t)["nsd"] for t in (1.0, 3.0)] == [shifted, 1.0]
    # same shift read with the axes swapped: the 3 mm axis is now axis 0
    assert nsd(in_plane, ref, (3.0, 1.0, 1.0), 1.0) == pytest.approx(shifted)


def test_tolerance_for():
    overrides = {"liver": 5.0, "kidney": 3}
    assert tolerance_for("liver", 1.0, overrides) == 5.0
    assert tolerance_for("kidney", 1.0, overrides) == 3.0
    assert tolerance_for("spleen", 1.0, overrides) == 1.0
    assert tolerance_for("spleen", 2.0) == 2.0

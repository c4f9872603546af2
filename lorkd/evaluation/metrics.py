"""Per (case, label) segmentation metrics: confusion counts, Dice and normalised surface Dice.

NSD follows Nikolov et al. 2018 (arXiv 1809.04430) and DeepMind's ``surface-distance`` package:
surface elements (surfels) live on the corners of the voxel grid, one per 2x2x2 neighbourhood
that is neither all inside nor all outside; each surfel is weighted by the area of the
marching-cubes-like surface patch inside its neighbourhood, measured in mm² with the real
(anisotropic) spacing; a surfel counts as correct when the nearest surfel of the other mask is
at most ``tolerance_mm`` away (exact Euclidean distance in mm).

Empty-mask rules (``empty_rule``):

* ``"sat"`` (SAT, FLARE): reference and prediction empty -> 1.0; exactly one of them empty -> 0.0.
* ``"nnunet"`` (nnU-Net v2): reference empty -> NaN (excluded from means by ``nanmean``);
  prediction empty with reference present -> 0.0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.spatial import cKDTree

EmptyRule = Literal["sat", "nnunet"]
EMPTY_RULES: tuple[str, ...] = ("sat", "nnunet")

Corner = tuple[int, int, int]
_CORNERS: tuple[Corner, ...] = tuple(itertools.product((0, 1), repeat=3))


def _corner_bit(corner: Corner) -> int:
    """Bit of a 2x2x2 neighbourhood corner in the neighbourhood code (0..7)."""
    return 4 * corner[0] + 2 * corner[1] + corner[2]


# --------------------------------------------------------------------------- confusion counts, Dice


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of two boolean masks of one shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def _check_rule(empty_rule: str) -> None:
    if empty_rule not in EMPTY_RULES:
        raise ValueError(f"unknown empty_rule {empty_rule!r}; expected one of {EMPTY_RULES}")


def _empty_score(n_pred: int, n_ref: int, empty_rule: str) -> float | None:
    """Score fixed by the empty-mask rule, or None when both masks are non-empty."""
    _check_rule(empty_rule)
    if n_ref == 0:
        if empty_rule == "nnunet":
            return math.nan
        return 1.0 if n_pred == 0 else 0.0
    return 0.0 if n_pred == 0 else None


def dice(tp: int, fp: int, fn: int, empty_rule: EmptyRule = "sat") -> float:
    """Dice 2TP / (2TP + FP + FN), with the empty-mask rule for an empty reference or prediction."""
    fixed = _empty_score(tp + fp, tp + fn, empty_rule)
    return fixed if fixed is not None else 2.0 * tp / (2.0 * tp + fp + fn)


# --------------------------------------------------------------------------- surfel area table


def _neighbours(corner: Corner) -> Iterator[Corner]:
    for axis in range(3):
        flipped = list(corner)
        flipped[axis] = 1 - flipped[axis]
        yield tuple(flipped)  # type: ignore[misc]


def _components(corners: set[Corner]) -> list[set[Corner]]:
    """Groups of corners connected along cube edges."""
    left, groups = set(corners), []
    while left:
        frontier = [left.pop()]
        group = set(frontier)
        while frontier:
            for n in _neighbours(frontier.pop()):
                if n in left:
                    left.remove(n)
                    group.add(n)
                    frontier.append(n)
        groups.append(group)
    return groups


def _polygon(group: set[Corner], phase: set[Corner]) -> np.ndarray:
    """Cyclic polygon (m, 3) through the midpoints of the cube edges leaving ``group``.

    Consecutive vertices share a cube face; with at most 4 ``phase`` corners each face holds 0 or 2
    of a group's cut edges, so linking the pairs face by face closes a single cycle.
    """
    cuts = [(a, b) for a in sorted(group) for b in _neighbours(a) if b not in phase]
    on_face: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(cuts):
        for axis in range(3):
            if a[axis] == b[axis]:
                on_face.setdefault((axis, a[axis]), []).append(i)
    links: dict[int, list[int]] = {i: [] for i in range(len(cuts))}
    for i, j in on_face.values():
        links[i].append(j)
        links[j].append(i)
    order = [0, links[0][0]]
    while len(order) < len(cuts):
        order.append(next(n for n in links[order[-1]] if n != order[-2]))
    return np.array([np.add(*cuts[i]) / 2.0 for i in order])


def _triangulations(indices: Sequence[int]) -> Iterator[list[tuple[int, int, int]]]:
    """All triangulations of a polygon given by its vertex indices in cyclic order."""
    if len(indices) < 3:
        yield []
        return
    first, last = indices[0], indices[-1]
    for k in range(1, len(indices) - 1):
        for left in _triangulations(indices[: k + 1]):
            for right in _triangulations(indices[k:]):
                yield [*left, *right, (first, indices[k], last)]


def _triangle_areas(triangles: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Areas of triangles (t, 3 vertices, 3 coordinates in voxel units), scaled to mm²."""
    v = triangles * np.asarray(spacing, dtype=float)
    return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=-1)


def _largest_triangulation(polygon: np.ndarray) -> np.ndarray:
    """Triangles (t, 3, 3) of the triangulation with the largest area in voxel units.

    Planar polygons have a single area; for the non-planar ones (3 corners in an L, 4 in a chain)
    the largest triangulation is the one of DeepMind's marching-cubes normals table.
    """
    candidates = [polygon[np.array(t)] for t in _triangulations(range(len(polygon)))]
    return max(candidates, key=lambda tris: _triangle_areas(tris).sum())


@lru_cache(maxsize=1)
def _code_triangles() -> tuple[np.ndarray, np.ndarray]:
    """Surface triangles of every neighbourhood code: (code per triangle, triangles (t, 3, 3)).

    The surface separates the minority phase (inside corners if at most 4, else outside corners,
    so complementary codes share a surface); each edge-connected group of that phase is enclosed
    by one polygon through the midpoints of its cut cube edges.
    """
    codes, triangles = [], []
    for code in range(1, 255):
        inside = {c for c in _CORNERS if code >> _corner_bit(c) & 1}
        phase = inside if len(inside) <= 4 else set(_CORNERS) - inside
        for group in _components(phase):
            tris = _largest_triangulation(_polygon(group, phase))
            codes += [code] * len(tris)
            triangles.append(tris)
    return np.array(codes), np.concatenate(triangles)


@lru_cache(maxsize=64)
def surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area in mm² of the surfel of each of the 256 neighbourhood codes at ``spacing``."""
    codes, triangles = _code_triangles()
    return np.bincount(codes, weights=_triangle_areas(triangles, spacing), minlength=256)


# --------------------------------------------------------------------------- surface Dice


def _joint_crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box and zero-padded by one voxel on every side."""
    union = pred | ref
    yx = union.any(axis=2)
    bounds = []
    for profile in (yx.any(axis=1), yx.any(axis=0), union.any(axis=(0, 1))):
        hits = np.flatnonzero(profile)
        bounds.append(slice(hits[0], hits[-1] + 1))
    box = tuple(bounds)
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def _neighbourhood_codes(mask: np.ndarray) -> np.ndarray:
    """uint8 code of every 2x2x2 neighbourhood of a padded mask (shape minus 1 along each axis)."""
    m = mask.view(np.uint8)
    n0, n1, n2 = (s - 1 for s in mask.shape)
    code = np.zeros((n0, n1, n2), dtype=np.uint8)
    for c in _CORNERS:
        code |= m[c[0] : c[0] + n0, c[1] : c[1] + n1, c[2] : c[2] + n2] << np.uint8(_corner_bit(c))
    return code


def _surfels(mask: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices (n, 3) of the surfels of a padded mask and their areas in mm²."""
    code = _neighbourhood_codes(mask)
    border = (code != 0) & (code != 255)
    return np.argwhere(border), table[code[border]]


def _nearest_distances(
    src: np.ndarray, dst: np.ndarray, spacing: np.ndarray, max_distance: float
) -> np.ndarray:
    """Distance in mm from each grid point of ``src`` to the nearest of ``dst``; inf beyond ``max_distance``.

    Same values as DeepMind's ``distance_transform_edt(~border, sampling=spacing)`` read at ``src``
    (the length of the index difference scaled by the spacing), from a k-d tree search bounded by
    ``max_distance``, which is several times faster than a distance map of the whole bounding box.
    """
    bound = max_distance * (1.0 + 1e-9)
    _, nearest = cKDTree(dst * spacing).query(src * spacing, distance_upper_bound=bound)
    found = nearest < len(dst)
    distances = np.full(len(src), np.inf)
    distances[found] = np.linalg.norm((src[found] - dst[nearest[found]]) * spacing, axis=1)
    distances[distances > max_distance] = np.inf
    return distances


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], max_distance: float = math.inf
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surfel distances and areas of two non-empty 3D masks (DeepMind's ``compute_surface_distances``).

    Returns (distances pred->ref, surfel areas of pred, distances ref->pred, surfel areas of ref),
    in mm and mm²; distances above ``max_distance`` are reported as inf.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.ndim != 3 or pred.shape != ref.shape or len(spacing) != 3:
        raise ValueError(
            f"expected two 3D masks of one shape and 3 spacings, got {pred.shape}, {ref.shape}, {spacing}"
        )
    if not (pred.any() and ref.any()):
        raise ValueError("surface distances need two non-empty masks")
    spacing_t = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    table = surfel_area_table(spacing_t)
    pred_c, ref_c = _joint_crop(pred, ref)
    points_pred, area_pred = _surfels(pred_c, table)
    points_ref, area_ref = _surfels(ref_c, table)
    scale = np.array(spacing_t)
    return (
        _nearest_distances(points_pred, points_ref, scale, max_distance),
        area_pred,
        _nearest_distances(points_ref, points_pred, scale, max_distance),
        area_ref,
    )


def _surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice of two non-empty masks (DeepMind's ``compute_surface_dice_at_tolerance``)."""
    d_pred, a_pred, d_ref, a_ref = surface_distances(pred, ref, spacing, max_distance=tolerance_mm)
    within = a_pred[d_pred <= tolerance_mm].sum() + a_ref[d_ref <= tolerance_mm].sum()
    return float(within / (a_pred.sum() + a_ref.sum()))


def nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    empty_rule: EmptyRule = "sat",
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` with the empty-mask rule."""
    fixed = _empty_score(int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), empty_rule)
    return fixed if fixed is not None else _surface_dice(pred, ref, spacing, tolerance_mm)


# --------------------------------------------------------------------------- per (case, label)


def tolerance_for(label: str, default: float, overrides: Mapping[str, float] | None = None) -> float:
    """NSD tolerance in mm of ``label``: its entry in ``overrides`` (exact label name) or ``default``.

    E.g. FLARE's per-organ table ``{"liver": 5.0, "kidney": 3.0}`` with ``default=1.0`` (SAT).
    """
    return float((overrides or {}).get(label, default))


def case_label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    empty_rule: EmptyRule = "sat",
) -> dict[str, int | float]:
    """Confusion counts, voxel counts, Dice and NSD of one label of one case."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    tp, fp, fn = confusion_counts(pred, ref)
    fixed = _empty_score(tp + fp, tp + fn, empty_rule)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
        "dice": dice(tp, fp, fn, empty_rule),
        "nsd": fixed if fixed is not None else _surface_dice(pred, ref, spacing, tolerance_mm),
    }


def voxels_outside(mask: np.ndarray, body: np.ndarray, margin: int = 0) -> int:
    """Voxels of ``mask`` farther than ``margin`` voxels (chessboard distance) from ``body``."""
    near = binary_dilation(body, structure=np.ones((3,) * body.ndim, bool), iterations=margin) if margin else body
    return int(np.count_nonzero(mask & ~near))

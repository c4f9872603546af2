"""Voxel grids without MONAI: the target grid of an orientation + spacing, and resampling between grids.

Both reproduce MONAI 1.x bit for bit (``Orientation`` + ``Spacing`` run lazily for :func:`target_grid`;
``SpatialResample(padding_mode="border", align_corners=False, dtype=float32)`` for :func:`resample`),
with the same float64/float32 steps in the same order, so preprocessing caches and predictions do
not change (``tests/test_data_grid.py`` compares against MONAI). Importing MONAI costs 1-3 s (it loads
every submodule), which ``predict.py``'s start-up cannot afford.

:func:`resample` builds ``torch.nn.functional.affine_grid``'s sampling grid slab by slab along the
first output axis (the same base grid, its per-axis products summed in ``affine_grid``'s order: the same
floats), so its memory is one slab's grid, not 12 bytes per output voxel; :func:`resample_slabs` hands
the values over slab by slab as well. Only output voxels that can matter are sampled: those that reach a
box of the source (``support``, :func:`reach`) or lie in a box of the output (``within``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

AFFINE_TOL = 1e-3  # MONAI's tolerance: a spacing this close to the target is kept; an xform this close to I is a no-op
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
MODES = ("bilinear", "nearest")
SLAB_VOXELS = 1 << 22  # output voxels per slab of the sampling grid (48 MiB of float32 coordinates)


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes of a 4x4 affine (norms of its columns; 0 read as 1)."""
    spacing = np.sqrt(np.sum(affine[:3, :3] * affine[:3, :3], axis=0))
    spacing[spacing == 0] = 1.0
    return spacing


def _zoomed_affine(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``affine``'s rotation with voxel sizes ``spacing`` and no translation (MONAI ``zoom_affine``)."""
    rzs = affine[:-1, :-1]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new_affine = np.eye(4)
    new_affine[:-1, :-1] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(spacing))
    return new_affine


def _shape_offset(shape: Sequence[int], in_affine: np.ndarray, out_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape of ``out_affine``'s grid covering the input's voxel centres, and its origin (MONAI
    ``compute_shape_offset``: the corner nearest the origin of the output axes, else the centres aligned)."""
    shape_f = np.array(tuple(shape), dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in shape_f], indexing="ij")).reshape((3, -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(out_affine, in_affine) @ corners
    corners = in_affine @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    for i in range(corners.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], 1), 0.0, rtol=AFFINE_TOL):
            return out_shape.astype(int), corners[:-1, i]
    offset = in_affine[:-1, :-1] @ (shape_f / 2.0) + in_affine[:-1, -1] - out_affine[:-1, :-1] @ (out_shape / 2.0)
    return out_shape.astype(int), offset


def target_grid(
    shape: Sequence[int], affine: np.ndarray, orientation: str | None, spacing: Sequence[float] | None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (float64) and shape of a (X, Y, Z) grid reoriented to ``orientation`` (axis codes such as
    "RAS", or None to keep the axes) and resampled to ``spacing`` mm (None: keep the voxel size)."""
    out_shape = tuple(int(s) for s in shape)
    if not orientation and spacing is None:
        return np.asarray(affine, dtype=np.float64), out_shape  # type: ignore[return-value]
    current = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    if orientation:
        ornt = nib.orientations.ornt_transform(
            nib.io_orientation(current.numpy()), nib.orientations.axcodes2ornt(orientation[:3], labels=AXIS_LABELS)
        )
        flip_permute = torch.as_tensor(nib.orientations.inv_ornt_aff(ornt, out_shape), dtype=torch.float64)
        current = torch.matmul(current, flip_permute)
        out_shape = tuple(out_shape[i] for i in np.argsort(ornt[:, 0]))
    if spacing is not None:
        affine_np = current.numpy().copy()
        target = np.array(tuple(spacing), dtype=np.float64)
        own = _spacing(affine_np)
        kept = np.where((target - AFFINE_TOL <= own) & (own <= target + AFFINE_TOL), own, target)  # MONAI's rule
        new_affine = _zoomed_affine(affine_np, kept)
        grid_shape, offset = _shape_offset(out_shape, affine_np, new_affine)
        new_affine[:3, -1] = offset[:3]
        current = torch.matmul(current, torch.as_tensor(np.linalg.solve(affine_np, new_affine), dtype=torch.float64))
        out_shape = tuple(int(s) for s in grid_shape)
    return current.numpy().astype(np.float64, copy=True), out_shape  # type: ignore[return-value]


def _normalizer(size: Sequence[int]) -> torch.Tensor:
    """(1, 4, 4) float32 map from voxel indices to grid_sample's [-1, 1] (align_corners=False)."""
    shape = torch.tensor([float(s) for s in size], dtype=torch.float64)
    norm = shape.clone()
    norm[norm <= 0.0] = 2.0
    norm = torch.diag(torch.cat((2.0 / norm, torch.ones((1,), dtype=torch.float64))))
    norm[:-1, -1] = 1.0 / shape - 1.0
    return norm.unsqueeze(0).to(torch.float32)


def _grid_theta(xform: np.ndarray, src_size: Sequence[int], dst_size: Sequence[int]) -> torch.Tensor:
    """(1, 3, 4) float32 ``affine_grid`` theta for a voxel-to-voxel ``xform`` (dst index -> src index)."""
    theta = torch.as_tensor(xform, dtype=torch.float64).to(torch.float32)[None]
    dst_inverse = torch.from_numpy(np.linalg.inv(_normalizer(dst_size).numpy()))
    theta = _normalizer(src_size) @ theta @ dst_inverse
    reverse = torch.tensor([2, 1, 0])  # grid_sample's coordinates are (z, y, x) order of the last axes
    theta[:, :3] = theta[:, reverse]
    theta[:, :, :3] = theta[:, :, reverse]
    return theta[:, :3]


def _base_axis(steps: int) -> torch.Tensor:
    """``affine_grid``'s normalised voxel centres along one axis (align_corners=False), float32."""
    if steps <= 1:
        return torch.zeros(steps, dtype=torch.float32)
    return torch.linspace(-1, 1, steps, dtype=torch.float32) * (steps - 1) / steps


def _slab_grids(
    theta: torch.Tensor, dst_shape: Sequence[int], box: tuple[slice, slice, slice], slab_voxels: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """The grid ``affine_grid(theta)`` of ``dst_shape`` at the output voxels of ``box``, slab by slab of at
    most ``slab_voxels`` voxels along the first axis: (the slab's first row in the box, its (rows, ny, nz, 3)
    grid, valid until the next slab)."""
    xs, ys, zs = (_base_axis(int(n))[b] for n, b in zip(dst_shape, box))
    nx, ny, nz = len(xs), len(ys), len(zs)
    if nx * ny * nz == 0:
        return
    matrix = theta[0].T  # (4, 3): rows for z, y, x and the constant; columns the grid's coordinates
    # affine_grid's (z, y, x, 1) @ matrix, summed in its order (z, then y, then x, then the constant): each
    # product depends on one axis only, so it is computed once per axis, and the sums give the same floats
    z_part, y_part = zs[:, None] * matrix[0], ys[:, None] * matrix[1]
    yz = z_part[None] + y_part[:, None]  # (ny, nz, 3)
    step = min(nx, max(1, slab_voxels // max(ny * nz, 1)))
    grid = torch.empty((step, ny, nz, 3), dtype=torch.float32)
    for start in range(0, nx, step):
        rows = min(step, nx - start)
        x_part = xs[start : start + rows, None] * matrix[2]  # (rows, 3)
        torch.add(yz[None], x_part[:, None, None], out=grid[:rows])
        grid[:rows] += matrix[3]
        yield start, grid[:rows]


def _sample_box(
    img: torch.Tensor,
    theta: torch.Tensor,
    dst_shape: Sequence[int],
    mode: str,
    box: tuple[slice, slice, slice],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grid_sample of (C, X, Y, Z) ``img`` at the output voxels of ``box`` on the grid ``affine_grid(theta)``
    of ``dst_shape``, slab by slab, into ``out`` (C, *box sizes) (a new tensor when None)."""
    if out is None:
        out = torch.empty((img.shape[0], *(b.stop - b.start for b in box)), dtype=torch.float32)
    src = img[None].contiguous()
    for start, grid in _slab_grids(theta, dst_shape, box, SLAB_VOXELS):
        _grid_sample_rows(src, grid, mode, out[:, start : start + grid.shape[0]])
    return out


def _grid_sample_rows(src: torch.Tensor, grid: torch.Tensor, mode: str, out: torch.Tensor) -> None:
    """grid_sample of (1, C, ...) ``src`` at the (rows, ny, nz, 3) ``grid`` into ``out`` (C, rows, ny, nz)."""
    for first, values in _sampled_parts(src, grid, mode):
        out[:, first : first + values.shape[1]] = values


def _sampled_parts(src: torch.Tensor, grid: torch.Tensor, mode: str) -> Iterator[tuple[int, torch.Tensor]]:
    """grid_sample of (1, C, ...) ``src`` at the (rows, ny, nz, 3) ``grid``, part by part of the rows: (the
    part's first row, its (C, part rows, ny, nz) values).

    PyTorch's CPU kernel for 3-D grids runs its threads over the batch only, so the rows go in as a batch
    of up to ``torch.get_num_threads()`` parts (each voxel's arithmetic is unchanged: the same values)."""
    rows = grid.shape[0]
    parts = max(1, min(torch.get_num_threads(), rows))
    even = rows - rows % parts
    for first, stop, batch in ((0, even, parts), (even, rows, rows - even)):
        if stop > first:
            step = (stop - first) // batch
            sampled = F.grid_sample(
                src.expand(batch, *src.shape[1:]),
                grid[first:stop].reshape(batch, step, *grid.shape[1:]),
                mode=mode,
                padding_mode="border",
                align_corners=False,
            )  # (batch, C, step, ny, nz)
            for part in range(batch):
                yield first + part * step, sampled[part]


def _reach(
    xform: np.ndarray, src_shape: Sequence[int], support: Sequence[slice], dst_shape: Sequence[int]
) -> tuple[slice, slice, slice] | None:
    """Box of destination voxels whose interpolation may touch the source voxels in ``support`` (a box of
    the source); the voxels outside it read only voxels outside ``support``. None for a rotated grid."""
    matrix, offset = xform[:3, :3], xform[:3, 3]
    axes = np.argmax(np.abs(matrix), axis=1)  # destination axis that moves along each source axis
    if sorted(axes.tolist()) != [0, 1, 2] or np.count_nonzero(np.abs(matrix) > 1e-12) != 3:
        return None
    box = [slice(0, int(n)) for n in dst_shape]
    for i, j in enumerate(axes):
        lo, hi, size = support[i].start, support[i].stop, int(src_shape[i])
        scale = matrix[i, j]
        # source coordinate c = scale * d + offset touches floor(c), floor(c) + 1 (border-clamped): it can
        # reach [lo, hi) only for c in [lo - 1, hi]; a side on the source's border reaches everything beyond
        reach = (lo - 1.0 if lo > 0 else -np.inf, hi if hi < size else np.inf)
        bounds = sorted((c - offset[i]) / scale for c in reach)
        first = 0 if not np.isfinite(bounds[0]) else max(0, int(np.floor(bounds[0])) - 1)
        last = int(dst_shape[j]) if not np.isfinite(bounds[1]) else min(int(dst_shape[j]), int(np.ceil(bounds[1])) + 2)
        box[j] = slice(first, max(first, last))
    return tuple(box)  # type: ignore[return-value]


def reach(
    src_shape: Sequence[int],
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    support: Sequence[slice],
    margin: Sequence[int] = (0, 0, 0),
) -> tuple[slice, slice, slice] | None:
    """Box of the output grid (``dst_affine``, ``dst_shape``) whose voxels may read the source voxels in
    ``support`` when resampled from ``src_affine``, grown by ``margin`` voxels per axis (within the
    output); every output voxel outside it reads only source voxels outside ``support``. None for a
    rotated grid."""
    xform = np.linalg.solve(np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64))
    box = _reach(xform, src_shape, support, dst_shape)
    if box is None:
        return None
    return tuple(slice(max(0, b.start - m), min(int(n), b.stop + m)) for b, m, n in zip(box, margin, dst_shape))  # type: ignore[return-value]


def resample(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str,
    support: Sequence[slice] | None = None,
    within: Sequence[slice] | None = None,
) -> np.ndarray:
    """Resample a channel-first (C, X, Y, Z) array from the grid ``src_affine`` to (``dst_affine``,
    ``dst_shape``): ``mode`` "bilinear" (trilinear) or "nearest", border padding, float32 result.

    Grids that agree within 1e-3 (affines, or the voxel-to-voxel map and the identity) with the same
    shape return the array as float32 without resampling, as MONAI does. ``support``: a box of the
    source outside which ``array`` is 0 (e.g. a crop put back into its grid); on axis-aligned grids only
    the output voxels that can reach it are sampled, the others are 0 (the same values, less work).
    ``within``: a box of the output; only its voxels are sampled and returned, (C, *box sizes).
    """
    if within is not None and support is not None:
        raise ValueError("give support or within, not both")
    img, shape, box, theta = _plan(array, src_affine, dst_affine, dst_shape, mode, support)
    if within is not None:
        within = tuple(within)
        if theta is None:
            return img.numpy()[(slice(None), *within)]
        with torch.inference_mode():
            return _sample_box(img, theta, shape, mode, within).numpy()  # type: ignore[arg-type]
    if theta is None:
        return img.numpy()
    with torch.inference_mode():
        if box == tuple(slice(0, s) for s in shape):
            return _sample_box(img, theta, shape, mode, box).numpy()
        out = torch.zeros((img.shape[0], *shape), dtype=torch.float32)  # never sampled outside the box
        _sample_box(img, theta, shape, mode, box, out[(slice(None), *box)])
        return out.numpy()


def resample_slabs(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str,
    support: Sequence[slice] | None,
) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """:func:`resample` at the output voxels that can reach ``support`` (a box of the source) only, slab
    by slab along the first output axis: (the slab's box in the output, its (C, *slab sizes) values, a new
    array each). Every output voxel outside the slabs interpolates source voxels outside ``support``
    alone (0 where the array is 0 there; at most their maximum in general). The whole output without
    ``support``, on rotated grids and where the grids agree (then in one slab, the array itself).

    A slab's values and sampling coordinates together take at most the coordinates of ``SLAB_VOXELS``
    voxels (48 MiB), so a caller that consumes each slab in turn never holds the whole box."""
    img, shape, box, theta = _plan(array, src_affine, dst_affine, dst_shape, mode, support)
    if theta is None:
        yield box, img.numpy()
        return
    src, channels, (xs, ys, zs) = img[None].contiguous(), img.shape[0], box
    with torch.inference_mode():
        for start, grid in _slab_grids(theta, shape, box, SLAB_VOXELS * 3 // (3 + channels)):
            for first, values in _sampled_parts(src, grid, mode):  # slabs of a slab: no copy
                first += xs.start + start
                yield (slice(first, first + values.shape[1]), ys, zs), values.numpy()


class _Plan(NamedTuple):
    """What a resampling needs: the source as a float32 tensor, the output's shape and the box of it to
    sample, and ``affine_grid``'s theta (None when the grids agree: the source is the output)."""

    img: torch.Tensor
    shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    theta: torch.Tensor | None


def _plan(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str,
    support: Sequence[slice] | None,
) -> _Plan:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"expected a channel-first (C, X, Y, Z) array, got shape {array.shape}")
    src = np.asarray(src_affine, dtype=np.float64)
    dst = np.asarray(dst_affine, dtype=np.float64)
    try:
        xform = np.linalg.solve(src, dst)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"source affine is not invertible: {src.tolist()}") from e
    shape = tuple(int(s) for s in dst_shape)
    everything = tuple(slice(0, s) for s in shape)
    img = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if shape == tuple(array.shape[1:]) and (
        np.allclose(src, dst, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
    ):
        return _Plan(img, shape, everything, None)  # type: ignore[arg-type]
    box = (None if support is None else _reach(xform, array.shape[1:], support, shape)) or everything
    return _Plan(img, shape, box, _grid_theta(xform, array.shape[1:], shape))  # type: ignore[arg-type]

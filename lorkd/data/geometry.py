"""Masks on their image: a mask's grid compared with its image's, and brought onto the image's grid.

Two grids agree when every corner voxel centre of one lies within :data:`GEOMETRY_TOLERANCE` mm of
the other's (1e-3 of a voxel for voxels over 1 mm), which bounds spacing, direction and origin
together. A mask whose grid is its image's:

* as it is: used as it is;
* up to an axis permutation or flip (another orientation, e.g. LAS for an RAS image): reoriented
  exactly (no interpolation);
* resampled, i.e. another voxel size over the same space (the same outer voxel faces, within the
  tolerance, axes matched up to permutation and flip): resampled onto the image's grid, nearest
  neighbour;
* anything else (shifted, rotated, another field of view): :class:`~lorkd.data.image_reader.CaseError` naming
  both files and what differs. A mask is never read voxel by voxel on another grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lorkd.data.image_reader import CaseError, header_grid, read_volume

GEOMETRY_TOLERANCE = 1e-3  # mm (fraction of a voxel for voxels over 1 mm): grids this close are one grid


@dataclass(frozen=True)
class Grid:
    """A voxel grid: its (X, Y, Z) shape and voxel-to-world (RAS mm) affine."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)

    def describe(self) -> str:
        """E.g. ``64x64x32 voxels of 1x1x3 mm, RAS, origin (0, 0, 0)``."""
        codes = "".join(nib.aff2axcodes(self.affine))
        origin = ", ".join(f"{v:.4g}" for v in np.asarray(self.affine)[:3, 3])
        spacing = "x".join(f"{v:.4g}" for v in self.spacing)
        return f"{'x'.join(map(str, self.shape))} voxels of {spacing} mm, {codes}, origin ({origin})"


@dataclass(frozen=True)
class Placement:
    """How a mask's grid maps onto its image's: ``how`` is "same", "reoriented" or "resampled";
    ``ornt`` the nibabel orientation transform from the mask's axes to the image's."""

    how: str
    ornt: np.ndarray


def _corners(grid: Grid, low: float, high_offset: float) -> np.ndarray:
    """World positions (8, 3) of the grid's corners at indices ``low`` and ``n - 1 + high_offset``."""
    ends = [(low, n - 1 + high_offset) for n in grid.shape]
    index = np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1)
    affine = np.asarray(grid.affine, dtype=np.float64)
    return (affine[:3, :3] @ index + affine[:3, 3:]).T


def _tolerance(*grids: Grid) -> float:
    return GEOMETRY_TOLERANCE * max(1.0, *(float(g.spacing.max()) for g in grids))


def _reoriented(mask: Grid, image: Grid) -> tuple[Grid, np.ndarray]:
    """The mask's grid with its axes permuted and flipped to match the image's, and that transform."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(mask.affine), nib.io_orientation(image.affine))
    affine = np.asarray(mask.affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, mask.shape)
    shape = tuple(int(mask.shape[int(i)]) for i in np.argsort(ornt[:, 0]))
    return Grid(shape, affine), ornt


def placement(mask: Grid, image: Grid) -> Placement:
    """How ``mask`` lies on ``image`` (see the module docstring); a ValueError saying what differs."""
    if len(mask.shape) != 3 or len(image.shape) != 3:
        raise ValueError(f"not 3-D grids (mask shape {mask.shape}, image shape {image.shape})")
    turned, ornt = _reoriented(mask, image)
    tol = _tolerance(mask, image)
    same_axes = bool(np.array_equal(ornt, nib.orientations.axcodes2ornt("RAS")))
    if turned.shape == tuple(image.shape):
        gap = np.linalg.norm(_corners(turned, 0.0, 0.0) - _corners(image, 0.0, 0.0), axis=1).max()
        if gap <= tol:
            return Placement("same" if same_axes else "reoriented", ornt)
    faces = np.linalg.norm(_corners(turned, -0.5, 0.5) - _corners(image, -0.5, 0.5), axis=1)
    if faces.max() <= tol:
        return Placement("resampled", ornt)
    raise ValueError(_discrepancy(turned, image, faces) + f" (mask: {mask.describe()}; image: {image.describe()})")


def _discrepancy(turned: Grid, image: Grid, faces: np.ndarray) -> str:
    edges = np.asarray(turned.affine)[:3, :3] * np.asarray(turned.shape) - np.asarray(image.affine)[:3, :3] * np.asarray(image.shape)
    if np.abs(edges).max() <= _tolerance(turned, image):  # the same box, moved
        shift = _corners(turned, -0.5, 0.5)[0] - _corners(image, -0.5, 0.5)[0]
        return f"shifted by {np.linalg.norm(shift):.4g} mm ({', '.join(f'{v:+.4g}' for v in shift)} mm)"
    return f"the grids cover different spaces (outer voxel faces up to {faces.max():.4g} mm apart)"


def onto_image(data: np.ndarray, mask: Grid, image: Grid, where: Placement) -> np.ndarray:
    """A mask's (X, Y, Z) voxels on its image's grid (dtype kept; nearest neighbour where resampled)."""
    if where.how == "same":
        return data
    if where.how == "reoriented":
        return np.ascontiguousarray(nib.orientations.apply_orientation(data, where.ornt))
    from lorkd.data.grid import resample  # torch: not imported by the manifest checker

    values = resample(data[None].astype(np.float32), mask.affine, image.affine, image.shape, "nearest")[0]
    return (np.rint(values) if np.issubdtype(data.dtype, np.integer) else values).astype(data.dtype)


def mask_placement(mask_path: str | Path, image_path: str | Path, image: Grid) -> tuple[Grid, Placement]:
    """The mask file's grid (from its header) and how it lies on its image; :class:`CaseError` naming
    both files when it does not."""
    mask = Grid(*header_grid(mask_path))
    try:
        return mask, placement(mask, image)
    except ValueError as exc:
        raise CaseError(
            f"mask {mask_path} does not lie on its image {image_path}: {exc}; fix the mask's header or "
            f"resample it onto the image (grids within {GEOMETRY_TOLERANCE:g} mm count as one)"
        ) from exc


def read_mask(
    path: str | Path, image_path: str | Path, image: Grid, nan_policy: str = "error"
) -> np.ndarray:
    """A mask file's voxels (as stored) on its image's grid: checked from the header before any voxel
    is read, then reoriented or resampled as :func:`placement` says."""
    mask, where = mask_placement(path, image_path, image)
    data = read_volume(path, nan_policy, dtype=None).data
    return onto_image(data, mask, image, where)

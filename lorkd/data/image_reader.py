"""Reading volumes (NIfTI or anything nibabel reads, DICOM series folders) with errors that name the file."""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from lorkd.data.volume import CaseError, Volume  # also imported from here
from lorkd.io import printable

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "zero")
_BLOCK = (64, 32, 32)  # voxels per block copied by :func:`reordered`: source and destination stay in the cache


def squeeze_to_3d(array: np.ndarray, name: str) -> np.ndarray:
    """Drop singleton channel/time axes (trailing, as NIfTI stores them, or one leading); else fail."""
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise CaseError(f"{name}: expected a 3-D volume (or 4-D with a singleton channel), got shape {shape}")
    return array


def reordered(
    data: np.ndarray, order: str = "C", dtype: type | np.dtype | None = None, threads: int | None = None
) -> np.ndarray:
    """``np.asarray(data, dtype, order=order)`` for a 3-D array: C or Fortran (NIfTI's on-disk) order, cast
    to ``dtype`` (None: kept); ``data`` itself when nothing changes.

    Between the two orders the copy goes block by block: numpy's one pass is 2-3x slower (every voxel far
    from the last one in one of the arrays), on ``threads`` threads (None: :func:`available_cores`). All-zero blocks of integer or boolean
    data (most of a mask) are not copied: the new array is zero there.
    """
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {data.shape}")
    target = data.dtype if dtype is None else np.dtype(dtype)
    if data.flags.c_contiguous if order == "C" else data.flags.f_contiguous:
        return np.asarray(data, dtype=target, order=order)  # already in order: at most a cast
    out = np.zeros(data.shape, dtype=target, order=order)
    dst, src = (out.T, data.T) if order == "F" else (out, data)  # ``dst`` is C-ordered
    skip_zeros = data.dtype.kind in "biu"
    threads = available_cores() if threads is None else threads
    corners = list(itertools.product(*(range(0, n, b) for n, b in zip(dst.shape, _BLOCK))))

    def copy(share: list[tuple[int, ...]]) -> None:
        for corner in share:
            block = tuple(slice(c, c + b) for c, b in zip(corner, _BLOCK))
            part = src[block]
            if not skip_zeros or part.any():
                dst[block] = part

    if threads > 1:  # numpy's copies release the GIL
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(copy, [corners[i::threads] for i in range(threads)]))
    else:
        copy(corners)
    return out


def available_cores(most: int = 4) -> int:
    """CPU cores this process may run on (its affinity), at most ``most``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(most, cores))


def open_nifti(path: str | Path, what: str = "image") -> nib.spatialimages.SpatialImage:
    """``nibabel.load`` of a file (its header read, its voxels on access); :class:`CaseError` names the file
    (``<path>: file not found``, ``<path>: cannot read <what> (...)``). Every NIfTI the project reads opens here."""
    try:
        return nib.load(str(path))
    except FileNotFoundError as exc:
        raise CaseError(f"{path}: file not found") from exc
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise CaseError(f"{path}: cannot read {what} ({exc})") from exc


def read_voxels(path: str | Path, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """A file's voxels as stored (no conversion, no check) and its affine (float64); errors as :func:`open_nifti`."""
    img = open_nifti(path, what)
    try:
        return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # gzip, zlib, nibabel: many error types for a damaged file
        raise CaseError(f"{path}: cannot read {what} ({exc})") from exc


def header_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape (singleton trailing axes dropped) and affine from the header only: no voxel data is
    read (a folder: its DICOM series' headers)."""
    if Path(path).is_dir():
        from lorkd.data.dicom import series_affine, series_headers

        headers = series_headers(path)
        return (int(headers[0].Columns), int(headers[0].Rows), len(headers)), series_affine(headers)
    img = open_nifti(path, "image header")
    shape, affine = tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, affine


def check_finite(array: np.ndarray, name: str, nan_policy: str) -> np.ndarray:
    """Raise on NaN/Inf voxels (``nan_policy='error'``) or replace them by 0 (``'zero'``)."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not np.issubdtype(array.dtype, np.floating):
        return array
    finite = np.isfinite(array)
    if finite.all():
        return array
    bad = int(finite.size - np.count_nonzero(finite))
    if nan_policy == "error":
        raise CaseError(
            f"{name}: {bad} NaN/Inf voxel(s) of {finite.size}; fix the file or replace them by 0 with "
            "inference.nan_policy=zero (predict.py, eval.py) or data.preprocess.nan_policy=zero (train.py)"
        )
    log.warning("%s: replacing %d NaN/Inf voxel(s) by 0", printable(name), bad)
    return np.where(finite, array, 0).astype(array.dtype, copy=False)


def read_volume(path: str | Path, nan_policy: str = "error", dtype: type | None = np.float32) -> Volume:
    """Load a 3-D volume as ``dtype`` (None: as stored) with its affine; :class:`CaseError` names the file.

    A folder is read as one DICOM series (:mod:`lorkd.data.dicom`, the ``dicom`` extra).
    """
    name = str(path)
    if Path(path).is_dir():
        from lorkd.data.dicom import read_dicom_series

        volume = read_dicom_series(path)
        data = volume.data if dtype is None else volume.data.astype(dtype, copy=False)
        return Volume(check_finite(data, name, nan_policy), volume.affine, name)
    data, affine = read_voxels(name)
    if data.dtype.fields is not None:
        raise CaseError(f"{name}: voxels of type {data.dtype} (e.g. RGB) are not supported; give one grey channel")
    data = squeeze_to_3d(data, name)
    data = check_finite(reordered(data, "C", dtype), name, nan_policy)  # NIfTI's Fortran order
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CaseError(f"{name}: invalid (singular or non-finite) affine {affine.tolist()}")
    return Volume(data=data, affine=affine, name=name)

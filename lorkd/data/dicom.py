"""Read a folder holding one DICOM image series as a 3-D volume with its RAS affine (pydicom).

Geometry: the in-plane axes come from ImageOrientationPatient, the voxel size from PixelSpacing and
the distance between slices, the slice order from ImagePositionPatient projected on the slice
normal; values are stored values × RescaleSlope + RescaleIntercept (Hounsfield units on CT). The
array is indexed (column, row, slice), so ``affine @ [i, j, k, 1]`` is the RAS position of pixel
(row j, column i) of the k-th slice in position order (DICOM's LPS with x and y negated).

A folder that is not exactly one complete, evenly spaced single-frame image series (several series,
files without pixels or geometry, differing orientations or sizes, missing or duplicate slices) is
a :class:`~lorkd.data.volume.CaseError` naming the folder and the problem. Files without the DICOM
preamble (``DICM`` at byte 128) and ``DICOMDIR`` are not part of a series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.volume import CaseError, Volume

SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the median gap that counts as uneven
_IMAGE = ("SeriesInstanceUID", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (preamble + ``DICM``), never a ``DICOMDIR``."""
    if not path.is_file() or path.name.upper() == "DICOMDIR":
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (sorted by name)."""
    return sorted(p for p in folder.iterdir() if is_dicom_file(p))


def is_dicom_series(folder: Path) -> bool:
    """A folder that holds at least one DICOM file directly."""
    return folder.is_dir() and any(is_dicom_file(p) for p in folder.iterdir())


def _read(path: Path, pixels: bool) -> Any:
    try:
        import pydicom
    except ImportError:
        raise ImportError(f'reading DICOM ({path}) needs the dicom extra: pip install -e ".[dicom]"') from None

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise CaseError(f"{path}: not a readable DICOM file ({exc})") from exc


def _normal(dataset: Any) -> np.ndarray:
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def series_headers(folder: str | Path) -> list[Any]:
    """The headers (no pixels) of the one image series in ``folder``, in slice position order.

    Each dataset keeps its file name in ``filename``; raises :class:`CaseError` for anything but one
    complete, evenly spaced single-frame image series.
    """
    folder = Path(folder)
    files = dicom_files(folder) if folder.is_dir() else []
    if not files:
        raise CaseError(f"{folder}: no DICOM files (a folder holding one DICOM series was expected)")
    headers = [_read(p, pixels=False) for p in files]
    not_images = [Path(h.filename).name for h in headers if any(k not in h for k in _IMAGE)]
    if not_images:
        raise CaseError(
            f"{folder}: {len(not_images)} file(s) are not images of a series with a position and orientation "
            f"(e.g. {not_images[0]}); keep only the image series in the folder"
        )
    series = sorted({str(h.SeriesInstanceUID) for h in headers})
    if len(series) > 1:
        raise CaseError(
            f"{folder}: holds {len(series)} DICOM series ({', '.join(series)}); put each series in its own folder"
        )
    frames = [Path(h.filename).name for h in headers if int(getattr(h, "NumberOfFrames", 1) or 1) > 1]
    if frames:
        raise CaseError(f"{folder}: multi-frame (enhanced) DICOM is not supported ({frames[0]}); convert it to NIfTI")
    _check_same(folder, headers, "ImageOrientationPatient", 1e-4)
    _check_same(folder, headers, "PixelSpacing", 1e-4)
    _check_same(folder, headers, "Rows", 0)
    _check_same(folder, headers, "Columns", 0)
    if len(headers) < 2:
        raise CaseError(f"{folder}: a single slice is not a 3-D series")
    normal = _normal(headers[0])
    positions = [float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=np.float64))) for h in headers]
    order = np.argsort(positions, kind="stable")
    _check_spacing(folder, np.asarray(positions)[order])
    return [headers[i] for i in order]


def _check_same(folder: Path, headers: Sequence[Any], key: str, tolerance: float) -> None:
    first = np.asarray(headers[0].get(key), dtype=np.float64)
    for h in headers[1:]:
        value = np.asarray(h.get(key), dtype=np.float64)
        if value.shape != first.shape or not np.allclose(value, first, atol=tolerance, rtol=0):
            raise CaseError(
                f"{folder}: {key} differs between slices ({Path(headers[0].filename).name}: {first.tolist()}, "
                f"{Path(h.filename).name}: {value.tolist()}); one series of one geometry was expected"
            )


def _check_spacing(folder: Path, positions: np.ndarray) -> None:
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    if median <= 1e-6 or np.any(gaps <= 1e-6):
        raise CaseError(f"{folder}: several slices share one position (duplicate slices, or more than one series)")
    uneven = np.flatnonzero(np.abs(gaps - median) > SPACING_TOLERANCE * median)
    if uneven.size:
        i = int(uneven[0])
        raise CaseError(
            f"{folder}: uneven slice spacing: {gaps[i]:.3f} mm between slices {i} and {i + 1} "
            f"against {median:.3f} mm elsewhere ({uneven.size} such gap(s); missing slices?)"
        )


def series_affine(headers: Sequence[Any]) -> np.ndarray:
    """The RAS voxel-to-world affine of sorted ``headers`` for arrays indexed (column, row, slice)."""
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    first = np.asarray(headers[0].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(headers[-1].ImagePositionPatient, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing  # along a row: the column index grows
    affine[:3, 1] = orientation[3:] * row_spacing  # along a column: the row index grows
    affine[:3, 2] = (last - first) / (len(headers) - 1)
    affine[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def read_dicom_series(folder: str | Path) -> Volume:
    """The series in ``folder`` as float32 (column, row, slice) with its RAS affine (see the module docstring)."""
    headers = series_headers(folder)
    slices = []
    for header in headers:
        dataset = _read(Path(header.filename), pixels=True)
        if "PixelData" not in dataset:
            raise CaseError(f"{header.filename}: a DICOM image without pixel data")
        try:
            pixels = dataset.pixel_array
        except Exception as exc:  # missing decoder, truncated pixel data
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = " ".join([lines[0], "; ".join(lines[1:])]).strip()  # a decoder list after "...:" kept
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            kind = f" ({syntax.name})" if syntax is not None else ""
            raise CaseError(f"{header.filename}: cannot decode the pixel data{kind}: {reason}") from exc
        slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
        intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
        slices.append((pixels.astype(np.float32) * slope + intercept).T)
    return Volume(np.stack(slices, axis=-1), series_affine(headers), str(folder))

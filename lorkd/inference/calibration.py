"""Calibration cases of ``inference.precision=int8``: a manifest of a few cases like those to predict.

A calibration manifest is a prediction manifest (:mod:`lorkd.inference.inputs`): one line per case,
``{"image": ..., "label": [...], "modality": ...}``, paths relative to the manifest; masks are not
needed. Each network is calibrated on the windows of the cases whose labels it segments, with those
labels' queries; at most :data:`CALIBRATION_WINDOWS` windows per network, spread over its cases and
over each case's sliding-window positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.manifest import Case, LineDefaults, ManifestError, read_manifest
from lorkd.inference.sliding_window import window_starts
from lorkd.io import file_identity

CALIBRATION_WINDOWS = 16  # per network: NNCF's statistics settle with a few dozen; each costs one forward
HINT = 'inference.calibration=<manifest .jsonl of a few cases like yours: lines {"image": ..., "label": [...], "modality": ...}>'


def read_calibration(path: str | Path) -> list[Case]:
    """The cases of a calibration manifest; raises naming the file and every problem (missing images too)."""
    path = Path(path).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        what = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a .jsonl manifest"
        raise FileNotFoundError(f"calibration {path} {what}: give {HINT}")
    cases, problems = read_manifest(path, require_masks=False, defaults=LineDefaults())
    problems += [f"{path}:{c.line}: image {c.image} not found" for c in cases if not c.image.exists()]
    if problems:
        raise ManifestError(path, problems)
    return cases


def _image_identity(image: Path) -> Any:
    """A file's identity; a DICOM series folder's: that of each file in it."""
    if image.is_dir():
        return [file_identity(p) for p in sorted(image.iterdir()) if p.is_file()]
    return file_identity(image)


def calibration_identity(cases: Sequence[Case]) -> dict[str, Any]:
    """What the int8 models calibrated on ``cases`` depend on: each image's identity, labels, modality, region
    and orientation, and the window budget."""
    rows = [[_image_identity(c.image), c.labels, c.modality, c.region, c.orientation] for c in cases]
    return {"cases": rows, "windows": CALIBRATION_WINDOWS}


def pick_windows(image: np.ndarray, window: Sequence[int], overlap: float, count: int, cval: float) -> list[np.ndarray]:
    """Up to ``count`` windows (1, 1, X, Y, Z) float32 of a preprocessed image (1, X, Y, Z), evenly spread over
    its sliding-window positions (an image smaller than the window padded with ``cval`` around it, as there)."""
    pad = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2) for s, w in zip(image.shape[1:], window)]
    padded = np.pad(image, ((0, 0), *pad), constant_values=cval)
    starts = [window_starts(s, w, overlap) for s, w in zip(padded.shape[1:], window)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    chosen = sorted({round(i * (len(corners) - 1) / max(count - 1, 1)) for i in range(min(count, len(corners)))})
    return [
        np.ascontiguousarray(padded[(None, slice(None), *(slice(o, o + w) for o, w in zip(corners[i], window)))], np.float32)
        for i in chosen
    ]


def windows_per_case(cases: int) -> int:
    """Windows taken from each of ``cases`` cases so that a network sees about :data:`CALIBRATION_WINDOWS`."""
    return max(1, math.ceil(CALIBRATION_WINDOWS / max(cases, 1)))

"""Training-patch geometry and SAT's query choice, as pure numpy functions.

A :class:`LabelIndex` (per-label bounding box and a sample of foreground voxels) is computed once
per preprocessed case and cached with it, so label-centred crops and the "which labels are in this
crop" test never scan whole volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorkd.data.transforms import PreprocessedCase

Box = tuple[int, int, int, int, int, int]  # x0, y0, z0, x1, y1, z1 (exclusive ends)


@dataclass
class LabelIndex:
    """Per label: bounding box (None when absent) and up to ``max_voxels`` foreground voxels (k, 3)."""

    boxes: list[Box | None]
    voxels: list[np.ndarray]


@dataclass
class IndexedCase:
    """A preprocessed case and its label index: what a patch is cut from."""

    data: PreprocessedCase
    index: LabelIndex


def index_labels(masks: np.ndarray, max_voxels: int = 4096, seed: int = 0) -> LabelIndex:
    """Bounding box and a deterministic sample of foreground voxels for each mask channel."""
    rng = np.random.default_rng(seed)
    boxes: list[Box | None] = []
    voxels: list[np.ndarray] = []
    for channel in masks:
        coords = np.argwhere(channel)
        if coords.size == 0:
            boxes.append(None)
            voxels.append(np.zeros((0, 3), dtype=np.int32))
            continue
        lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
        boxes.append(tuple(int(v) for v in (*lo, *hi)))  # type: ignore[arg-type]
        if len(coords) > max_voxels:
            coords = coords[np.sort(rng.choice(len(coords), size=max_voxels, replace=False))]
        voxels.append(coords.astype(np.int32))
    return LabelIndex(boxes=boxes, voxels=voxels)


def index_case(data: PreprocessedCase) -> IndexedCase:
    return IndexedCase(data=data, index=index_labels(data.masks))


def crop_start(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, center: Sequence[int] | None = None
) -> tuple[int, int, int]:
    """Patch origin: centred on ``center`` (clamped into the volume) or uniformly random.

    An axis shorter than the patch starts at 0 (the crop is padded at the high end, as SAT pads it).
    """
    start = []
    for axis, (size, p) in enumerate(zip(shape, patch)):
        high = max(int(size) - int(p), 0)
        if center is None:
            start.append(int(rng.integers(0, high + 1)))
        else:
            start.append(min(max(int(center[axis]) - int(p) // 2, 0), high))
    return tuple(start)  # type: ignore[return-value]


def crop_padded(
    array: Any, start: Sequence[int], patch: Sequence[int], channels: slice = slice(None), fill: float = 0
) -> np.ndarray:
    """(C, *patch) window of a (C, X, Y, Z) array at ``start``, padded with ``fill`` past the volume's end
    (masks: 0; images: their background, ``InversionInfo.background``, as inference pads them).

    ``array`` may be a memory map or any array-like with ``shape`` and channel+spatial slicing:
    only the window (of the selected ``channels``) is read.
    """
    src = tuple(slice(s, min(s + p, n)) for s, p, n in zip(start, patch, array.shape[1:]))
    region = np.asarray(array[(channels, *src)])
    if region.shape[1:] == tuple(patch):
        return np.array(region)
    out = np.full((region.shape[0], *patch), fill, dtype=region.dtype)
    out[(slice(None), *(slice(0, r) for r in region.shape[1:]))] = region
    return out


def box_overlaps(box: Box | None, start: Sequence[int], patch: Sequence[int]) -> bool:
    if box is None:
        return False
    return all(box[a] < start[a] + patch[a] and box[a + 3] > start[a] for a in range(3))


def select_queries(
    present: Sequence[bool], max_queries: int, rng: np.random.Generator, neg_ratio: float = 0.5
) -> list[int]:
    """SAT's query choice over a crop's labels; returns label positions, positives first.

    At most ``max_queries`` positives (a random subset when there are more), then
    ``min(max_queries - positives, int(neg_ratio * positives))`` random negatives; a crop with no
    positive gets ``min(max_queries, n)`` random labels.
    """
    positives = [i for i, p in enumerate(present) if p]
    negatives = [i for i, p in enumerate(present) if not p]
    if not positives:
        count = min(max_queries, len(negatives))
        return sorted(int(i) for i in rng.choice(negatives, size=count, replace=False))
    if len(positives) > max_queries:
        return sorted(int(i) for i in rng.choice(positives, size=max_queries, replace=False))
    count = min(max_queries - len(positives), int(neg_ratio * len(positives)), len(negatives))
    chosen = rng.choice(negatives, size=count, replace=False) if count > 0 else []
    return positives + sorted(int(i) for i in chosen)

"""Real scans cut into two halves: train on one half, evaluate on the other (held out).

* LiTS case 117 CT (``liver-ct-segmentation-package``): "liver" (the LiTS liver label with its
  tumours, the usual LiTS definition) and "liver tumor";
* the MNI152 2009a T1 at 2 mm over its whole field (``nilearn``): "grey matter", "white matter".

Both are cut along the anterior-posterior axis (RAS y; the MNI template is left-right symmetric, so a
hemisphere split would test on the mirror image of the training half): the posterior half trains,
the anterior half is the test case. Each half is a NIfTI file of its own with an exact affine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorkd.data.demo import _save, lits_arrays, mni_arrays

AXIS = 1  # RAS y: posterior (low indices) -> anterior
HALVES = (("posterior", "train"), ("anterior", "test"))


@dataclass(frozen=True)
class RealScan:
    key: str
    dataset: str
    modality: str
    arrays: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray] | None]
    masks: dict[str, Callable[[np.ndarray], np.ndarray]]  # label -> binary mask of the label map


SCANS = (
    RealScan(
        "lits_117",
        "LiTS",
        "ct",
        lits_arrays,
        {"liver": lambda ids: ids >= 1, "liver tumor": lambda ids: ids == 2},
    ),
    RealScan(
        "mni152_t1",
        "MNI152",
        "mri",
        mni_arrays,
        {"grey matter": lambda ids: ids == 1, "white matter": lambda ids: ids == 2},
    ),
)


def split_half(
    array: np.ndarray, affine: np.ndarray, axis: int, first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The first or second half of ``array`` along ``axis`` and the affine that keeps it in place."""
    middle = array.shape[axis] // 2
    start = 0 if first else middle
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, middle) if first else slice(middle, None)
    shift = np.eye(4)
    shift[axis, 3] = start
    return np.ascontiguousarray(array[tuple(index)]), np.asarray(affine, dtype=np.float64) @ shift


def build_real_halves(out: str | Path) -> dict[str, list[dict]]:
    """Write every available scan's two halves into ``out`` (images/, masks/, train.jsonl, test.jsonl);
    a scan whose package is missing is skipped. Returns the manifest lines per split."""
    out = Path(out)
    manifests: dict[str, list[dict]] = {split: [] for _, split in HALVES}
    for scan in SCANS:
        arrays = scan.arrays()
        if arrays is None:
            continue
        image, ids, affine = arrays
        for first, (half, split) in zip((True, False), HALVES):
            case_id = f"{scan.key}_{half}"
            part, part_affine = split_half(image, affine, AXIS, first)
            part_ids, _ = split_half(ids, affine, AXIS, first)
            _save(out / "images" / f"{case_id}.nii.gz", part, part_affine)
            masks = {}
            for label, select in scan.masks.items():
                name = f"masks/{case_id}_{label.replace(' ', '_')}.nii.gz"
                _save(out / name, select(part_ids).astype(np.uint8), part_affine)
                masks[label] = name
            manifests[split].append(
                {
                    "id": case_id,
                    "image": f"images/{case_id}.nii.gz",
                    "masks": masks,
                    "label": list(scan.masks),
                    "modality": scan.modality,
                    "dataset": scan.dataset,
                }
            )
    if not manifests["train"]:
        raise RuntimeError(
            "no real scan available: install liver-ct-segmentation-package (--no-deps) and/or nilearn"
        )
    for split, rows in manifests.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifests

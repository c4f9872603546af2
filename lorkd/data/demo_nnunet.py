"""The demo's abdomen CT phantoms as an nnU-Net v2 raw dataset, optionally with a structure the demo never saw.

``write_abdomen_dataset(out, train=8, test=4, new_label="gallbladder")`` writes ``dataset.json``,
``imagesTr``/``labelsTr`` and held-out ``imagesTs``/``labelsTs``: each case is the demo's abdomen phantom
(:func:`lorkd.data.demo.make_phantom_case`, cases numbered from ``first``) with, as label 6, a fluid-filled
ellipsoid (bile, 15 HU) below the liver whose centre and size vary per case. Same arguments, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorkd.data.demo import PHANTOMS, _jitter, _save, _scale, ellipsoid, make_phantom_case, world_coords

ABDOMEN = PHANTOMS[0]


def phantom_with_structure(seed: int, index: int, label_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16, label map uint8, affine) of abdomen case ``index``; with ``label_id``, the new structure drawn in."""
    image, labels, affine = make_phantom_case(ABDOMEN, seed, index)
    if label_id is None:
        return image, labels, affine
    rng = np.random.default_rng([seed, 27, index])
    w = world_coords(affine, labels.shape)
    region = ellipsoid(w, _jitter(rng, (10, 20, -4), 3), _scale(rng, (8, 7, 12)))
    image = image.copy()
    image[region] = np.rint(15 + rng.normal(0.0, 12.0, size=int(region.sum()))).astype(np.int16)
    labels = labels.copy()
    labels[region] = label_id
    return image, labels, affine


def write_abdomen_dataset(
    out: str | Path, train: int = 8, test: int = 4, new_label: str | None = "gallbladder", seed: int = 0, first: int = 100
) -> Path:
    """Write the nnU-Net dataset into ``out`` (module docstring); returns ``out``."""
    out = Path(out)
    names = ["_".join(label.split()) for label in ABDOMEN.labels] + ([new_label] if new_label else [])
    label_id = len(ABDOMEN.labels) + 1 if new_label else None
    for n in range(train + test):
        image, labels, affine = phantom_with_structure(seed, first + n, label_id)
        images, masks = ("imagesTr", "labelsTr") if n < train else ("imagesTs", "labelsTs")
        case = f"abdomen_{first + n:03d}"
        _save(out / images / f"{case}_0000.nii.gz", image, affine)
        _save(out / masks / f"{case}.nii.gz", labels, affine)
    description = {
        "name": "DemoAbdomenPlus",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(names)}},
        "numTraining": train,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return out

"""The demo data as nnU-Net v2 raw datasets.

``write_nnunet_datasets(data, out)`` writes the demo's manifests (``data/{train,val,test}.jsonl``, or any
manifests whose lines hold one label map) as one dataset per manifest ``dataset``: ``Dataset901_DemoAbdomenCT``,
``Dataset902_DemoThoraxCT``, ... in the order the datasets first appear. Train and val cases go to
``imagesTr``/``labelsTr`` (the files copied byte for byte as ``<id>_0000.nii.gz`` and ``<id>.nii.gz``) and
``splits_final.json`` holds the manifests' train/val split as fold 0, in manifest order; test cases go to
``imagesTs``/``labelsTs``; ``dataset.json`` names the channel after the modality (``CT``, ``MRI``) and the
labels in id order (spaces as underscores). A dataset only in the test manifest (the demo's real scans)
gets an empty ``imagesTr``. Training on the folders, given in the returned order
(``data.train_manifest=[DIR1,DIR2,...]``), reads the same cases, labels and order as the manifests.

The demo's abdomen CT phantoms as an nnU-Net v2 raw dataset, optionally with a structure the demo never saw:
``write_abdomen_dataset(out, train=8, test=4, new_label="gallbladder")`` writes ``dataset.json``,
``imagesTr``/``labelsTr`` and held-out ``imagesTs``/``labelsTs``: each case is the demo's abdomen phantom
(:func:`lorkd.data.demo.make_phantom_case`, cases numbered from ``first``) with, as label 6, a fluid-filled
ellipsoid (bile, 15 HU) below the liver whose centre and size vary per case. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lorkd.data.demo import PHANTOMS, _jitter, _save, _scale, ellipsoid, make_phantom_case, world_coords
from lorkd.data.manifest import Case, load_manifest
from lorkd.io import atomic_write, safe_name, write_json

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


SPLIT_FOLDERS = {"train": ("imagesTr", "labelsTr"), "val": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


def _ending(case: Case) -> str:
    """The file ending both of the case's files share ("" when none)."""
    if case.mask is None:
        return ""
    return next((e for e in (".nii.gz", ".nii") if case.image.name.endswith(e) and case.mask.name.endswith(e)), "")


def _problems(case: Case, first: Case) -> list[str]:
    """What keeps ``case`` (its dataset's first case: ``first``) out of an nnU-Net dataset."""
    where = f"{case.source}:{case.line}"
    problems = []
    if case.mask is None:
        problems.append(f"{where}: case {case.id!r} has no label map ('mask'); nnU-Net needs one label file per case")
    elif not _ending(case):
        problems.append(f"{where}: case {case.id!r}: image and mask must both be .nii.gz or .nii")
    elif _ending(case) != _ending(first):
        problems.append(f"{where}: case {case.id!r} is {_ending(case)}, dataset {case.dataset!r} {_ending(first)} (one file_ending)")
    if case.region or case.orientation:
        problems.append(f"{where}: case {case.id!r} sets 'region'/'orientation', which nnU-Net's dataset.json cannot hold")
    if (case.labels, case.modality) != (first.labels, first.modality):
        problems.append(
            f"{where}: case {case.id!r} has {case.modality} labels {case.labels}, not those of dataset {case.dataset!r}'s "
            f"first case ({first.modality} {first.labels}): an nnU-Net dataset has one modality and one label set"
        )
    problems += [f"{where}: label {label!r} holds '_' (nnU-Net names read back with '_' as a space)" for label in case.labels if "_" in label]
    return problems


def write_nnunet_datasets(data: str | Path, out: str | Path, first: int = 901) -> list[Path]:
    """The manifests ``data/{train,val,test}.jsonl`` as nnU-Net v2 raw datasets under ``out`` (module
    docstring); returns the dataset folders in the order to train on them. A ValueError lists every problem
    before anything is written."""
    data, out = Path(data), Path(out)
    splits: dict[str, list[Case]] = {}
    for split in SPLIT_FOLDERS:
        path = data / f"{split}.jsonl"
        splits[split] = load_manifest(path) if split == "train" or path.is_file() else []
    datasets: dict[str, dict[str, list[Case]]] = {}
    for split, cases in splits.items():
        for case in cases:
            datasets.setdefault(case.dataset, {s: [] for s in SPLIT_FOLDERS})[split].append(case)
    folders = {name: out / f"Dataset{first + n:03d}_{safe_name(name, 'dataset', 60)}" for n, name in enumerate(datasets)}
    problems = [f"{folder}: exists; remove it or write to another folder" for folder in folders.values() if folder.exists()]
    for parts in datasets.values():
        cases = [c for split in SPLIT_FOLDERS for c in parts[split]]
        problems += [p for case in cases for p in _problems(case, cases[0])]
    if problems:
        raise ValueError(f"{len(problems)} problem(s) writing {data} as nnU-Net datasets:\n" + "\n".join(problems))
    for name, parts in datasets.items():
        _write_dataset(folders[name], name, parts)
    return list(folders.values())


def _write_dataset(folder: Path, name: str, parts: Mapping[str, list[Case]]) -> None:
    """One dataset folder: the cases' files copied under nnU-Net's names, dataset.json, splits_final.json."""
    case = next(c for split in SPLIT_FOLDERS for c in parts[split])
    ending = _ending(case)
    for split, (images, labels) in SPLIT_FOLDERS.items():
        (folder / images).mkdir(parents=True, exist_ok=True)
        (folder / labels).mkdir(parents=True, exist_ok=True)
        for c in parts[split]:
            for source, target in ((c.image, folder / images / f"{c.id}_0000{ending}"), (c.mask, folder / labels / f"{c.id}{ending}")):
                atomic_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    trained = parts["train"] + parts["val"]
    if trained:
        write_json(folder / "splits_final.json", [{s: [c.id for c in parts[s]] for s in ("train", "val")}])
    write_json(folder / "dataset.json", {
        "name": name,
        "channel_names": {"0": case.modality.upper()},
        "labels": {"background": 0, **{label.replace(" ", "_"): i for i, label in enumerate(case.labels, start=1)}},
        "numTraining": len(trained),
        "file_ending": ending,
    })  # fmt: skip

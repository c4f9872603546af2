"""nnU-Net v2 raw datasets and Medical Segmentation Decathlon task folders as manifests.

* **nnU-Net v2**: ``dataset.json`` with ``channel_names`` ({"0": "CT"}), ``labels`` ({"background": 0,
  "liver": 1}), ``numTraining``, ``file_ending``; ``imagesTr/CASE_0000<ending>`` (one file per channel),
  ``labelsTr/CASE<ending>``, optional ``imagesTs/`` (and ``labelsTs/``), optional ``splits_final.json``.
* **Decathlon**: ``dataset.json`` with ``modality`` ({"0": "CT"}), ``labels`` ({"0": "background",
  "1": "liver"}), ``training`` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]),
  ``test`` (image paths); several modalities are one 4-D image.

Each becomes manifest lines (:mod:`lorkd.data.manifest`): the channel's name gives the modality (CT -> ct,
MRI sequence names -> mri, PET -> pet; with several channels ``channel`` picks one), label names become
prompts (underscores as spaces; a mapping file renames them and assigns regions), ids 1..N of the label
files stay the label map. Labels the region map does not know need a region (``region`` for all, or per
label in the mapping file); the lines carry it as ``label_region``. Train/val come from
``splits_final.json`` (a fold) when there is one, else from a seeded shuffle; ``imagesTs`` is the test split.

Every problem of a dataset is reported at once, each as ``<file>: <problem>``, before anything trains
(:class:`DatasetError`). The mapping file (YAML or JSON)::

    region: abdomen                      # region of every label the region map does not know
    labels:
      tumor: liver tumor                 # rename
      cyst: {name: kidney cyst, region: abdomen}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from lorkd.data.image_reader import open_nifti
from lorkd.data.manifest import Case, parse_rows
from lorkd.io import write_text
from lorkd.regions import RegionMap, UnknownModalityError, canonical_modality, mod_label, normalize_label

SPLITS = ("train", "val", "test")
ENDINGS = (".nii.gz", ".nii")
# nnU-Net v2 channel names that choose an intensity normalisation, not a modality
_NORMALISATIONS = {"zscore", "nonorm", "rescale_to_0_1", "rgb_to_0_1"}


class DatasetError(ValueError):
    """A dataset folder with problems; ``problems`` holds one ``<file>: <problem>`` string each."""

    def __init__(self, folder: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in dataset {folder}:\n" + "\n".join(problems))


@dataclass(frozen=True)
class ImportOptions:
    """How a dataset folder becomes manifests (``lorkd-data import`` and ``data.dataset_import``)."""

    channel: str | int | None = None  # the channel (name or index) of a multi-channel dataset
    modality: str | None = None  # overrides the channel's modality
    region: str | None = None  # region of every label the region map does not know
    mapping: str | None = None  # YAML/JSON file: per label a new name and/or region (module docstring)
    seed: int = 0  # train/val shuffle without splits_final.json
    val_fraction: float = 0.2
    fold: int = 0  # fold of splits_final.json
    splits: str | None = None  # a splits_final.json elsewhere (default: the folder's own, if any)
    dataset: str | None = None  # dataset name in the manifests (default: the folder's name)

    @classmethod
    def coerce(cls, value: ImportOptions | Mapping[str, Any] | None) -> ImportOptions:
        if isinstance(value, ImportOptions):
            return value
        values = dict(value or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown dataset import option(s) {unknown}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


@dataclass
class ImportedDataset:
    """A dataset folder's manifest lines per split and the labels it adds to the region map."""

    folder: Path
    format: str  # "nnunet" | "decathlon"
    rows: dict[str, list[dict[str, Any]]]
    added: dict[str, str] = field(default_factory=dict)  # "<modality>_<label>" -> region
    cases: dict[str, list[Case]] = field(default_factory=dict)


def is_dataset_folder(path: object) -> bool:
    """Whether ``path`` (any value: a list of manifests is none) is a folder holding a ``dataset.json`` (an
    nnU-Net or Decathlon dataset)."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / "dataset.json").is_file()


def _label_name(name: str) -> str:
    return normalize_label(str(name).replace("_", " "))


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: cannot read JSON ({exc})")
    return None


def _mapping(path: str | None, problems: list[str]) -> tuple[str | None, dict[str, dict[str, str]]]:
    """The mapping file's default region and per-label ``{"name": ..., "region": ...}`` (keys as in dataset.json)."""
    if path is None:
        return None, {}
    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        problems.append(f"{file}: mapping file not found")
        return None, {}
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{file}: cannot read the mapping file ({exc})")
        return None, {}
    if not isinstance(raw, dict) or set(raw) - {"region", "labels"}:
        problems.append(f"{file}: expected the keys 'region' and/or 'labels', got {raw!r}")
        return None, {}
    labels: dict[str, dict[str, str]] = {}
    for key, value in (raw.get("labels") or {}).items():
        entry = {"name": value} if isinstance(value, str) else value
        if not isinstance(entry, dict) or set(entry) - {"name", "region"} or not all(isinstance(v, str) for v in entry.values()):
            problems.append(f"{file}: label {key!r}: expected a new name or {{name: ..., region: ...}}, got {value!r}")
            continue
        labels[str(key)] = entry
    return raw.get("region"), labels


def _modality(description: Path, channels: Mapping[str, Any], options: ImportOptions, problems: list[str]) -> tuple[int, str]:
    """The channel index to read and its canonical modality."""
    names = {int(k): str(v) for k, v in channels.items()} if all(str(k).isdigit() for k in channels) else {}
    if not names:
        problems.append(f"{description}: channels {dict(channels)!r} must be numbered '0', '1', ...")
        return 0, ""
    if options.channel is None:
        if len(names) > 1:
            listed = ", ".join(f"{i}: {n}" for i, n in sorted(names.items()))
            problems.append(f"{description}: {len(names)} channels ({listed}); pick one with channel=<name or index>")
            return 0, ""
        index = next(iter(names))
    else:
        wanted = str(options.channel)
        hits = [i for i, n in names.items() if wanted == str(i) or wanted.lower() == n.lower()]
        if not hits:
            problems.append(f"{description}: no channel {options.channel!r}; channels are {names}")
            return 0, ""
        index = hits[0]
    raw = options.modality or names[index]
    try:
        if str(raw).lower() in _NORMALISATIONS:
            raise UnknownModalityError(raw)
        return index, canonical_modality(raw)
    except UnknownModalityError:
        problems.append(f"{description}: channel {index} is {names[index]!r}, not a modality; give modality=ct|mri|pet|us")
        return index, ""


def _labels(
    description: Path, raw: Any, decathlon: bool, mapping_path: str | None, problems: list[str]
) -> tuple[list[str], dict[str, str], str | None]:
    """Prompts for ids 1..N, the regions the mapping file gives some of them, and its default region (for the
    labels the region map does not know)."""
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{description}: 'labels' must be a non-empty mapping")
        return [], {}, None
    ids: dict[int, str] = {}
    for key, value in raw.items():
        name, value = (value, key) if decathlon else (key, value)
        if isinstance(value, (list, tuple)):
            problems.append(
                f"{description}: label {name!r} is an nnU-Net region-based label (ids {list(value)}); regions are "
                "not supported: give each structure its own id and list overlapping structures as labels of their own"
            )
            continue
        try:
            ids[int(value)] = str(name)
        except (TypeError, ValueError):
            problems.append(f"{description}: label {name!r} has id {value!r}, not an integer")
    if any(n.lower() == "ignore" for n in ids.values()):
        problems.append(f"{description}: nnU-Net's 'ignore' label (partial annotation) is not supported")
    ids.pop(0, None)
    if sorted(ids) != list(range(1, len(ids) + 1)):
        problems.append(f"{description}: label ids {sorted(ids)} must be consecutive from 1 (0 is background)")
    default_region, mapping = _mapping(mapping_path, problems)
    names, regions = [], {}
    for i in sorted(ids):
        entry = mapping.get(ids[i], {})
        name = _label_name(entry.get("name", ids[i]))
        names.append(name)
        if "region" in entry:
            regions[name] = entry["region"]
    unknown = sorted(set(mapping) - set(ids.values()))
    if unknown:
        problems.append(f"{mapping_path}: label(s) {unknown} are not in {description} (its labels: {sorted(ids.values())})")
    return names, regions, default_region


def _split(ids: list[str], folder: Path, options: ImportOptions, problems: list[str]) -> dict[str, list[str]]:
    """Train/val ids: from splits_final.json (its fold) when there is one, else a seeded shuffle."""
    splits_file = Path(options.splits).expanduser() if options.splits else folder / "splits_final.json"
    if options.splits or splits_file.is_file():
        folds = _read_json(splits_file, problems)
        if folds is None:
            return {"train": ids, "val": []}
        if not isinstance(folds, list) or not 0 <= options.fold < len(folds) or not isinstance(folds[options.fold], dict):
            problems.append(f"{splits_file}: no fold {options.fold} (expected a list of {{'train': [...], 'val': [...]}})")
            return {"train": ids, "val": []}
        chosen = {s: [str(i) for i in folds[options.fold].get(s, [])] for s in ("train", "val")}
        missing = sorted(set(chosen["train"] + chosen["val"]) - set(ids))
        if missing:
            problems.append(f"{splits_file}: fold {options.fold} names case(s) the dataset lacks: {missing[:10]}")
        return chosen
    order = list(np.random.default_rng(options.seed).permutation(len(ids)))
    n_val = int(round(options.val_fraction * len(ids)))
    if options.val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = {ids[i] for i in order[:n_val]}
    return {"train": [i for i in ids if i not in val], "val": [i for i in ids if i in val]}


def _ending(description: Path, meta: Mapping[str, Any], problems: list[str]) -> str:
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending not in ENDINGS:
        problems.append(f"{description}: file_ending {ending!r} is not supported (NIfTI only: {', '.join(ENDINGS)})")
    return ending


def _nnunet_cases(folder: Path, meta: Mapping[str, Any], ending: str, channel: int, problems: list[str]) -> dict[str, list[dict]]:
    """Per split: ``{"id", "image", "mask"?}`` of every case; every missing file is a problem."""
    n_channels = len(meta["channel_names"])
    found: dict[str, list[dict]] = {"train": [], "test": []}
    for split, images, labels in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        image_dir, label_dir = folder / images, folder / labels
        if not image_dir.is_dir():
            if split == "train":
                problems.append(f"{image_dir}: folder not found")
            continue
        ids = sorted({p.name[: -len(ending)][:-5] for p in image_dir.glob(f"*_[0-9][0-9][0-9][0-9]{ending}")})
        label_ids = {p.name[: -len(ending)] for p in label_dir.glob(f"*{ending}")} if label_dir.is_dir() else set()
        for case_id in ids:
            for c in range(n_channels):
                if not (image_dir / f"{case_id}_{c:04d}{ending}").is_file():
                    problems.append(f"{image_dir / f'{case_id}_{c:04d}{ending}'}: missing (case {case_id!r} has {n_channels} channel(s))")
            row = {"id": case_id, "image": str(image_dir / f"{case_id}_{channel:04d}{ending}")}
            if case_id in label_ids:
                row["mask"] = str(label_dir / f"{case_id}{ending}")
            elif split == "train":
                problems.append(f"{label_dir / (case_id + ending)}: label file missing for {image_dir / f'{case_id}_0000{ending}'}")
            found[split].append(row)
        for orphan in sorted(label_ids - set(ids)):
            problems.append(f"{label_dir / (orphan + ending)}: no image {image_dir / f'{orphan}_0000{ending}'} for this label file")
    expected = meta.get("numTraining")
    if isinstance(expected, int) and expected != len(found["train"]):
        problems.append(f"{folder / 'dataset.json'}: numTraining is {expected} but imagesTr holds {len(found['train'])} case(s)")
    return found


def _decathlon_path(folder: Path, value: Any) -> Path | None:
    return (folder / value).resolve() if isinstance(value, str) and value else None


def _decathlon_cases(folder: Path, meta: Mapping[str, Any], problems: list[str]) -> dict[str, list[dict]]:
    description = folder / "dataset.json"
    found: dict[str, list[dict]] = {"train": [], "test": []}
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        problems.append(f"{description}: 'training' must be a non-empty list of {{'image': ..., 'label': ...}}")
        training = []
    for n, entry in enumerate(training):
        image = _decathlon_path(folder, entry.get("image") if isinstance(entry, dict) else None)
        label = _decathlon_path(folder, entry.get("label") if isinstance(entry, dict) else None)
        if image is None or label is None:
            problems.append(f"{description}: training[{n}] must hold 'image' and 'label' paths, got {entry!r}")
            continue
        for path, what in ((image, "image"), (label, "label file")):
            if not path.is_file():
                problems.append(f"{path}: {what} missing (training[{n}] of {description})")
        found["train"].append({"id": _case_id(image), "image": str(image), "mask": str(label)})
    for n, entry in enumerate(meta.get("test") or []):
        image = _decathlon_path(folder, entry.get("image") if isinstance(entry, dict) else entry)
        if image is None or not image.is_file():
            problems.append(f"{image or description}: test image missing (test[{n}] of {description})")
            continue
        found["test"].append({"id": _case_id(image), "image": str(image)})
    return found


def _case_id(path: Path) -> str:
    name = path.name
    return next((name[: -len(e)] for e in ENDINGS if name.endswith(e)), name)


def _four_d(rows: Sequence[dict], channel: int, n_channels: int, problems: list[str]) -> None:
    """Decathlon images holding several modalities: the channel must exist (written out by :func:`write_manifests`)."""
    for row in rows:
        path = Path(row["image"])
        if not path.is_file():
            continue
        shape = open_nifti(path).shape
        if len(shape) != 4 or shape[3] != n_channels:
            problems.append(f"{path}: shape {tuple(shape)}, expected 4-D with {n_channels} channels as dataset.json's 'modality'")
        row["channel"] = channel


def import_dataset(
    folder: str | Path, options: ImportOptions | Mapping[str, Any] | None = None, region_map: RegionMap | None = None
) -> ImportedDataset:
    """Read an nnU-Net v2 or Decathlon dataset folder into manifest lines and validated cases per split
    (train, val, test; test only with ``imagesTs``); :class:`DatasetError` lists every problem."""
    options = ImportOptions.coerce(options)
    folder = Path(folder).expanduser().resolve()
    description = folder / "dataset.json"
    problems: list[str] = []
    meta = _read_json(description, problems) if folder.is_dir() else problems.append(f"{folder}: no such folder")
    if not isinstance(meta, dict):
        if meta is not None:
            problems.append(f"{description}: expected a JSON object")
        raise DatasetError(folder, problems or [f"{description}: not found"])
    decathlon = "modality" in meta and "channel_names" not in meta
    channels = meta.get("modality" if decathlon else "channel_names")
    if not isinstance(channels, dict) or not channels:
        problems.append(f"{description}: needs 'channel_names' (nnU-Net v2) or 'modality' (Decathlon)")
        raise DatasetError(folder, problems)
    channel, modality = _modality(description, channels, options, problems)
    labels, given, default_region = _labels(description, meta.get("labels"), decathlon, options.mapping, problems)
    if decathlon:
        found = _decathlon_cases(folder, meta, problems)
        if len(channels) > 1:
            for split in found.values():
                _four_d(split, channel, len(channels), problems)
    else:
        found = _nnunet_cases(folder, meta, _ending(description, meta, problems), channel, problems)
    added = _regions(description, labels, modality, given, default_region or options.region, options, region_map, problems)
    by_id = {row["id"]: row for row in found["train"]}
    parts = _split(sorted(by_id), folder, options, problems)
    dataset = options.dataset or str(meta.get("name") or folder.name)
    common = {"label": labels, "modality": modality, "dataset": dataset}
    if added:
        common["label_region"] = {label: added[mod_label(modality, label)] for label in labels if mod_label(modality, label) in added}
    rows = {
        "train": [{**by_id[i], **common} for i in parts["train"] if i in by_id],
        "val": [{**by_id[i], **common} for i in parts["val"] if i in by_id],
        "test": [{**row, **common} for row in found["test"]],
    }
    imported = ImportedDataset(folder, "decathlon" if decathlon else "nnunet", rows, added)
    if labels and modality:  # else every line would repeat the dataset's problem
        for split, split_rows in rows.items():
            if any("channel" in row for row in split_rows):
                continue  # 4-D images: checked once their channel is written out (write_manifests)
            present = [r for r in split_rows if all(Path(r[k]).is_file() for k in ("image", "mask") if k in r)]
            cases, found = parse_rows(present, [r.get("mask", r["image"]) for r in present], description, require_masks=False)
            imported.cases[split] = cases
            problems += found
    if problems:
        raise DatasetError(folder, problems)
    return imported


def _regions(
    description: Path, labels: list[str], modality: str, given: dict[str, str], default: str | None,
    options: ImportOptions, region_map: RegionMap | None, problems: list[str],
) -> dict[str, str]:
    """``"<modality>_<label>" -> region`` for the labels the region map does not know (``given`` per label, else
    ``default``); every such label needs one. A known label keeps its region; one given another is a problem."""
    if region_map is None or not modality:
        return {}
    added, missing = {}, []
    for label in labels:
        key = mod_label(modality, label)
        region = given.get(label, default)
        if key in region_map:
            known = region_map.label_region[key]
            if label in given and given[label] != known:
                problems.append(f"{options.mapping}: label {label!r} is in region {known!r} of the region map, not {given[label]!r}")
            continue
        if region is None:
            close = region_map.closest(modality, label)
            missing.append(f"{label!r}" + (f" (closest known: {', '.join(close)})" if close else ""))
        elif region not in region_map.regions:
            problems.append(f"{description}: region {region!r} for label {label!r} is none of {region_map.regions}")
        else:
            added[key] = region
    if missing:
        problems.append(
            f"{description}: label(s) {', '.join(missing)} unknown to the region map: rename them in a mapping file "
            "(mapping=FILE) or give their region (region=<region> for all, or per label in the mapping file)"
        )
    return added


def _write_channel(row: dict[str, Any], out: Path) -> dict[str, Any]:
    """A Decathlon 4-D image's chosen channel as a 3-D file under ``out/images``; the row pointing at it."""
    source = Path(row["image"])
    image = open_nifti(source)
    data = np.asarray(image.dataobj[..., row["channel"]])
    target = out / "images" / f"{row['id']}_{row['channel']:04d}.nii.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    header = image.header.copy()
    header.set_data_shape(data.shape)
    nib.save(nib.Nifti1Image(data, image.affine, header), str(target))
    return {**{k: v for k, v in row.items() if k != "channel"}, "image": str(target)}


def write_manifests(imported: ImportedDataset, out: str | Path) -> dict[str, Path]:
    """``out/{train,val,test}.jsonl`` (test only when the dataset has test images; a 4-D Decathlon image's
    channel written to ``out/images``); returns the files written."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    problems: list[str] = []
    for split in SPLITS:
        rows = imported.rows[split]
        if not rows:
            continue
        if any("channel" in row for row in rows):
            rows = [_write_channel(row, out) for row in rows]
            where = [row.get("mask", row["image"]) for row in rows]
            imported.cases[split], found = parse_rows(rows, where, out / f"{split}.jsonl", require_masks=False)
            problems += found
        written[split] = write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if problems:
        raise DatasetError(imported.folder, problems)
    return written


def summary(imported: ImportedDataset, written: Mapping[str, Path]) -> str:
    """What ``lorkd-data import`` wrote and how to train on it."""
    first = next(row for rows in imported.rows.values() for row in rows)
    lines = [f"{imported.folder} ({imported.format}): {first['modality']}, labels {', '.join(first['label'])}"]
    lines += [f"  {split}: {len(imported.rows[split])} case(s) -> {path}" for split, path in written.items()]
    lines += [f"  new label {key.split('_', 1)[1]!r} ({key.split('_', 1)[0]}) -> region {region}" for key, region in sorted(imported.added.items())]
    train = f"data.train_manifest={written['train']}" if "train" in written else ""
    val = f" data.val_manifest={written['val']}" if "val" in written else ""
    lines.append(f"train with: lorkd-train experiment=... {train}{val}")
    return "\n".join(lines)

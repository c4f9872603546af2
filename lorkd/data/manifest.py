"""SAT-DS compatible jsonl manifests: one case a line, validated up front.

A line::

    {"image": "ct/case1.nii.gz", "label": ["liver", "spleen"], "modality": "ct",
     "dataset": "AbdomenCT1K", "mask": "ct/case1_seg.nii.gz", "id": "case1"}

``mask`` is an integer label map whose id j+1 is ``label[j]``; or ``masks`` maps each label to a
binary file. Optional: ``id`` (default: image basename without ``.nii.gz``/``.nii``), ``region``
(forces the expert), ``orientation`` (axis codes such as "ASR"), ``label_region`` (``{label: region}``
for labels the region map does not know: training adds them to the map, see :func:`add_labels`;
``lorkd-data import`` writes it). Other keys (SAT-DS's
``patient_id``, ``official_split``...) are ignored. Relative paths resolve against the manifest's
folder. Every line with problems is reported as ``<file>:<line>: <problem>[; <problem>...]``, all of
them at once.

Prediction reads the same lines with :class:`LineDefaults` (the command line's prompts): a line may
then leave out ``label``, ``modality``, ``region``, ``orientation`` and ``dataset``; its
``mask``/``masks`` are not read, and its image (a file or a DICOM series folder) is read only when
its case runs, so an unreadable image fails that case alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.geometry import Grid, mask_placement
from lorkd.data.image_reader import CaseError, header_grid, read_voxels
from lorkd.io import file_identity
from lorkd.regions import (
    RegionMap,
    UnknownLabelError,
    UnknownModalityError,
    canonical_modality,
    mod_label,
    normalize_label,
)

_AXES = ({"L", "R"}, {"P", "A"}, {"I", "S"})


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` holds one ``<file>:<line>: <problem>`` string each."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in manifest {path}:\n" + "\n".join(problems))


@dataclass
class Case:
    """One manifest line, paths absolute, labels normalised, modality canonical."""

    image: Path
    labels: list[str]
    modality: str
    dataset: str
    mask: Path | None
    masks: dict[str, Path] | None
    id: str
    region: str | None
    orientation: str | None
    line: int
    source: Path
    added: dict[str, str] = field(default_factory=dict)  # label -> region for labels new to the region map


def add_labels(region_map: RegionMap, cases: Sequence[Case]) -> RegionMap:
    """Put the cases' new labels (their lines' ``label_region``) into ``region_map``, in place; returns it."""
    for case in cases:
        for label, region in case.added.items():
            region_map.add(label, case.modality, region)
    return region_map


@dataclass(frozen=True)
class LineDefaults:
    """What a prediction manifest's line may leave out: the command line's labels (normalised),
    modality (canonical), region and orientation (axis codes)."""

    labels: list[str] | None = None
    modality: str | None = None
    region: str | None = None
    orientation: str | None = None


def _identity(path: Path) -> dict[str, Any] | str:
    try:
        return file_identity(path)
    except OSError:
        return f"missing: {path}"


def case_identity(case: Case) -> dict[str, Any]:
    """What a case's results depend on: its prompts, geometry options, and the identity (path, size,
    mtime_ns) of its image and mask files; a replaced file or an edited line changes it."""
    masks = {label: _identity(path) for label, path in sorted((case.masks or {}).items())}
    return {
        "dataset": case.dataset,
        "id": case.id,
        "labels": list(case.labels),
        "modality": case.modality,
        "region": case.region,
        "orientation": case.orientation,
        "image": _identity(case.image),
        "mask": _identity(case.mask) if case.mask is not None else None,
        "masks": masks or None,
    }


def default_id(image: str | Path) -> str:
    name = Path(image).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def axcodes(value: object, what: str) -> str:
    """``value`` as upper-case axis codes (``"asr"`` -> ``"ASR"``); a ValueError naming ``what`` otherwise."""
    letters = value.upper() if isinstance(value, str) else ""
    if len(letters) != 3 or not all(sum(c in axis for c in letters) == 1 for axis in _AXES):
        raise ValueError(f"invalid {what} {value!r}; expected 3 axis codes such as 'RAS' or 'ASR'")
    return letters


def load_manifest(
    path: str | Path, require_masks: bool = True, region_map: RegionMap | None = None
) -> list[Case]:
    """Parse and validate a manifest; raise :class:`ManifestError` listing every problem."""
    cases, problems = _parse(Path(path), require_masks, region_map)
    if problems:
        raise ManifestError(Path(path), problems)
    return cases


def validate_manifest(
    path: str | Path, require_masks: bool = True, region_map: RegionMap | None = None, deep: bool = False
) -> list[str]:
    """The problems :func:`load_manifest` would raise, without raising.

    ``deep`` also reads every voxel: truncated or corrupt compressed files, and label-map ids above
    the line's number of labels (slow: each file is decompressed).
    """
    return _parse(Path(path), require_masks, region_map, deep)[1]


def read_manifest(
    path: str | Path,
    require_masks: bool = True,
    region_map: RegionMap | None = None,
    defaults: LineDefaults | None = None,
) -> tuple[list[Case], list[str]]:
    """The valid cases and the problems of the other lines, for runs that go on past bad lines
    (evaluation); with ``defaults``, the lines of a prediction manifest (see the module docstring)."""
    return _parse(Path(path), require_masks, region_map, defaults=defaults)


def parse_rows(
    rows: Sequence[dict[str, Any]], where: Sequence[str], source: Path, require_masks: bool = True,
    region_map: RegionMap | None = None,
) -> tuple[list[Case], list[str]]:
    """Manifest lines held in memory (an imported dataset's): the valid cases, and each problem as
    ``<where[i]>: <problem>`` (``where[i]`` names row i's files); relative paths resolve against
    ``source``'s folder."""
    cases: list[Case] = []
    problems: list[str] = []
    for number, (row, name) in enumerate(zip(rows, where), start=1):
        case, errors = _parse_line(json.dumps(row), source, number, require_masks, region_map)
        problems += [f"{name}: {error}" for error in errors]
        if case is not None:
            cases.append(case)
    return cases, problems


def _parse(
    path: Path,
    require_masks: bool,
    region_map: RegionMap | None,
    deep: bool = False,
    defaults: LineDefaults | None = None,
) -> tuple[list[Case], list[str]]:
    if not path.is_file():
        return [], [f"{path}: manifest not found"]
    path = path.resolve()
    cases: list[Case] = []
    problems: list[str] = []
    first_line: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            case, errors = _parse_line(text, path, number, require_masks, region_map, deep, defaults)
            if errors:
                problems.append(f"{path}:{number}: " + "; ".join(errors))
            if case is None:
                continue
            key = (case.dataset, case.id)
            if key in first_line:
                problems.append(
                    f"{path}:{number}: duplicate id {case.id!r} in dataset {case.dataset!r} "
                    f"(first on line {first_line[key]})"
                )
                continue
            first_line[key] = number
            cases.append(case)
    if not cases and not problems:
        problems.append(f"{path}: manifest has no cases")
    return cases, problems


def _parse_line(
    text: str,
    source: Path,
    number: int,
    require_masks: bool,
    region_map: RegionMap | None,
    deep: bool = False,
    defaults: LineDefaults | None = None,
) -> tuple[Case | None, list[str]]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"bad JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(row, dict):
        return None, [f"expected a JSON object, got {type(row).__name__}"]
    errors: list[str] = []
    root = source.parent
    predicting = defaults is not None
    given = defaults or LineDefaults()

    image = _path_field(row, "image", root, errors, required=True, exists=not predicting)
    labels = _labels(row, errors, given.labels, predicting)
    modality = _modality(row, errors, given.modality, predicting)
    dataset = row.get("dataset", "" if predicting else None)
    if not isinstance(dataset, str) or not (dataset.strip() or predicting):
        errors.append("missing or empty 'dataset'")
        dataset = ""
    mask, masks = None, None
    if not predicting:
        mask = _path_field(row, "mask", root, errors, required=False)
        masks = _masks(row, labels, root, errors)
    if mask is not None and masks is not None:
        errors.append("give either 'mask' (label map) or 'masks' (one file per label), not both")
    if require_masks and mask is None and masks is None and "mask" not in row and "masks" not in row:
        errors.append("missing 'mask' (or 'masks'); this manifest needs ground truth")
    region = _region(row, region_map, errors) if "region" in row else given.region
    added = _label_regions(row, labels, modality, region_map, errors)
    orientation = row.get("orientation", given.orientation)
    if orientation is not None:
        try:
            orientation = axcodes(orientation, "'orientation'")
        except ValueError as exc:
            errors.append(str(exc))
            orientation = None
    if region_map is not None and region is None and modality and labels:
        for label in (x for x in labels if x not in added):
            try:
                region_map.region_of(label, modality)
            except UnknownLabelError as exc:
                errors.append(str(exc))
    if image is not None and image.is_file() and not predicting:
        _check_grids(image, mask, masks, errors)
        if deep and not errors:
            _check_voxels(image, mask, masks, len(labels), errors)

    case_id = row.get("id", default_id(image) if image is not None else "")
    if not isinstance(case_id, str) or not case_id:
        errors.append(f"invalid 'id' {case_id!r}")
    if errors or image is None:
        return None, errors
    return (
        Case(
            image=image,
            labels=labels,
            modality=modality,
            dataset=dataset,
            mask=mask,
            masks=masks,
            id=case_id,
            region=region,
            orientation=orientation,
            line=number,
            source=source,
            added=added,
        ),
        [],
    )


def resolve_path(value: str, root: Path) -> Path:
    """A manifest path: absolute as given (``~`` expanded), or relative to the manifest's folder ``root``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def _path_field(
    row: dict[str, Any], key: str, root: Path, errors: list[str], required: bool, exists: bool = True
) -> Path | None:
    """The line's ``key`` as an absolute path; ``exists``: it must be a file."""
    value = row.get(key)
    if value is None:
        if required:
            errors.append(f"missing '{key}'")
        return None
    if not isinstance(value, str) or not value:
        errors.append(f"'{key}' must be a path string, got {value!r}")
        return None
    path = resolve_path(value, root)
    if exists and not path.is_file():
        errors.append(f"{key} file not found: {path}")
    return path


def _labels(row: dict[str, Any], errors: list[str], default: list[str] | None = None, cli: bool = False) -> list[str]:
    raw = row.get("label", row.get("labels"))
    if raw is None and default is not None:
        return list(default)
    if raw is None:
        errors.append("missing 'label' (a list of label names)" + (", and no labels=... on the command line" if cli else ""))
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        errors.append(f"'label' must be a list of strings, got {raw!r}")
        return []
    labels = [normalize_label(x) for x in raw]
    if not labels or not all(labels):
        errors.append("empty label list" if not labels else f"empty label name in {raw!r}")
        return []
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        errors.append(f"duplicate labels {duplicates}")
    return labels


def _modality(row: dict[str, Any], errors: list[str], default: str | None = None, cli: bool = False) -> str:
    raw = row.get("modality", default)
    if raw is None:
        errors.append("missing 'modality'" + (", and no modality=... on the command line" if cli else ""))
        return ""
    try:
        return canonical_modality(raw)
    except UnknownModalityError as exc:
        errors.append(str(exc))
        return ""


def _masks(row: dict[str, Any], labels: list[str], root: Path, errors: list[str]) -> dict[str, Path] | None:
    raw = row.get("masks")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        errors.append(f"'masks' must map label names to file paths, got {raw!r}")
        return None
    masks: dict[str, Path] = {}
    for name, value in raw.items():
        label = normalize_label(name)
        if labels and label not in labels:
            errors.append(f"'masks' has label {label!r} that is not in 'label'")
        path = resolve_path(value, root)
        if not path.is_file():
            errors.append(f"masks[{label!r}] file not found: {path}")
        masks[label] = path
    return masks


def _region(row: dict[str, Any], region_map: RegionMap | None, errors: list[str]) -> str | None:
    raw = row.get("region")
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        errors.append(f"invalid 'region' {raw!r}")
        return None
    region = raw.strip().lower().replace(" ", "_")
    if region_map is not None and region not in region_map.regions:
        errors.append(f"unknown region {raw!r}; expected one of {region_map.regions}")
        return None
    return region


def _label_regions(
    row: dict[str, Any], labels: list[str], modality: str, region_map: RegionMap | None, errors: list[str]
) -> dict[str, str]:
    """The line's ``label_region``: each a label of the line and an expert region; a label the map knows
    must keep its region."""
    raw = row.get("label_region")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        errors.append(f"'label_region' must map label names to regions, got {raw!r}")
        return {}
    added: dict[str, str] = {}
    for name, value in raw.items():
        label, region = normalize_label(name), value.strip().lower().replace(" ", "_")
        if label not in labels:
            errors.append(f"'label_region' has label {label!r} that is not in 'label'")
        elif region_map is not None and region not in region_map.regions:
            errors.append(f"label_region[{label!r}]: unknown region {value!r}; expected one of {region_map.regions}")
        elif region_map is not None and modality and region_map.label_region.get(mod_label(modality, label), region) != region:
            known = region_map.region_of(label, modality)
            errors.append(f"label_region[{label!r}] is {region!r} but the region map puts {label!r} in {known!r}")
        else:
            added[label] = region
    return added


def _check_grids(image: Path, mask: Path | None, masks: dict[str, Path] | None, errors: list[str]) -> None:
    """Headers only: the image is 3-D and each mask lies on it (:mod:`lorkd.data.geometry`)."""
    try:
        image_grid = Grid(*header_grid(image))
    except CaseError as exc:
        errors.append(str(exc))
        return
    if len(image_grid.shape) != 3:
        errors.append(f"{image}: image is not 3-D (shape {image_grid.shape})")
        return
    others = ([mask] if mask is not None else []) + list((masks or {}).values())
    for other in others:
        if not other.is_file():
            continue
        try:
            mask_placement(other, image, image_grid)
        except CaseError as exc:
            errors.append(str(exc))


def _voxels(path: Path, errors: list[str]) -> np.ndarray | None:
    try:
        return read_voxels(path, "voxels")[0]
    except CaseError as exc:
        errors.append(str(exc))
        return None


def _check_voxels(
    image: Path, mask: Path | None, masks: dict[str, Path] | None, n_labels: int, errors: list[str]
) -> None:
    """Every file decompresses in full; a label map has no id above ``n_labels``."""
    _voxels(image, errors)
    for path in (masks or {}).values():
        _voxels(path, errors)
    if mask is None:
        return
    ids = _voxels(mask, errors)
    if ids is None:
        return
    found = np.unique(ids)
    above = [int(i) if float(i).is_integer() else float(i) for i in found if i > n_labels or i < 0]
    if above:
        errors.append(
            f"mask {mask} has id(s) {above[:10]} outside 0..{n_labels} (the line has {n_labels} label(s))"
        )


def check(
    manifests: Sequence[str | Path],
    require_masks: bool = True,
    region_map: RegionMap | None = None,
    quick: bool = False,
) -> int:
    """Print every problem of each manifest as ``file:line: ...`` (or ``FILE: OK``); 1 if any has one, else 0.

    Command line (``configs/check_manifest.yaml``, see :func:`lorkd.cli.check_manifest`):
    ``python -m lorkd.commands.check_manifest manifests=[train.jsonl,val.jsonl] [regions=demo | ~regions] [require_masks=false] [quick=true]``

    Voxels are read too (truncated files, mask ids above a line's labels) unless ``quick`` (headers only).
    """
    failed = 0
    for path in manifests:
        problems = validate_manifest(path, require_masks=require_masks, region_map=region_map, deep=not quick)
        print("\n".join(problems) if problems else f"{path}: OK")
        failed += bool(problems)
    return 1 if failed else 0

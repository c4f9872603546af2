"""What ``python predict.py input=...`` predicts: a NIfTI file, a folder of NIfTI files and DICOM series
folders, one DICOM series folder, or a jsonl manifest (whose images may be DICOM series folders too).

Files and folders take ``labels`` and ``modality`` from the command line. A manifest line is
``{"image": ..., "label": [...], "modality": ..., "id"?, "region"?, "orientation"?}``; its labels
and modality default to the command line's, so a manifest may list images only. Lines with
problems (bad JSON, no labels, unknown modality, bad orientation) are reported together before
anything runs; an unreadable image is not checked here: it fails its own case only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lorkd.data.manifest import Case, ManifestError, axcodes, default_id, resolve_path
from lorkd.regions import UnknownModalityError, canonical_modality, normalize_labels

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def folder_images(path: Path) -> list[Path]:
    """A DICOM series folder itself, or the NIfTI files and DICOM series folders in ``path`` (sorted by name)."""
    from lorkd.data.dicom import is_dicom_series

    if is_dicom_series(path):
        return [path]
    return sorted(p for p in path.iterdir() if (p.is_file() and is_nifti(p)) or is_dicom_series(p))


def _case(
    image: Path, labels: list[str], modality: str, case_id: str, region: str | None,
    orientation: str | None, line: int, source: Path, dataset: str = "",
) -> Case:  # fmt: skip
    return Case(
        image=image,
        labels=labels,
        modality=modality,
        dataset=dataset,
        mask=None,
        masks=None,
        id=case_id,
        region=region,
        orientation=orientation,
        line=line,
        source=source,
    )


def discover_cases(
    input: str | Path,
    labels: Sequence[str] | str | None = None,
    modality: str | None = None,
    region: str | None = None,
    orientation: str | None = None,
) -> list[Case]:
    """The cases of ``input``, in a stable order (folders: sorted by file name)."""
    path = Path(input).expanduser()
    if orientation is not None:
        orientation = axcodes(str(orientation), "orientation")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        cases = _manifest_cases(path, labels, modality, region, orientation)
    else:
        if path.is_dir():
            files = folder_images(path)
            if not files:
                raise FileNotFoundError(f"no NIfTI files (*.nii.gz, *.nii) or DICOM series folders in folder {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(
                f"input {path} does not exist (give a NIfTI file, a folder or a .jsonl manifest)"
            )
        if labels is None or modality is None:
            raise ValueError(
                f"input {path} is not a manifest: give labels='[...]' and modality=... on the command line"
            )
        shared = normalize_labels(labels)
        mod = canonical_modality(modality)
        cases = [_case(f.resolve(), shared, mod, default_id(f), region, orientation, 0, path) for f in files]
    _check_unique(cases, path)
    return cases


def _manifest_cases(
    path: Path,
    labels: Sequence[str] | str | None,
    modality: str | None,
    region: str | None,
    orientation: str | None,
) -> list[Case]:
    cases: list[Case] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                cases.append(_manifest_line(text, path, number, labels, modality, region, orientation))
            except (ValueError, UnknownModalityError) as exc:
                problems.append(f"{path}:{number}: {exc}")
    if not cases and not problems:
        problems.append(f"{path}: manifest has no cases")
    if problems:
        raise ManifestError(path, problems)
    return cases


def _manifest_line(
    text: str,
    path: Path,
    number: int,
    labels: Sequence[str] | str | None,
    modality: str | None,
    region: str | None,
    orientation: str | None,
) -> Case:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("missing 'image' (a path)")
    image_path = resolve_path(image, path.parent)
    raw_labels = row.get("label", row.get("labels", labels))
    if raw_labels is None:
        raise ValueError("no 'label' on the line and no labels=... on the command line")
    raw_modality = row.get("modality", modality)
    if raw_modality is None:
        raise ValueError("no 'modality' on the line and no modality=... on the command line")
    line_orientation = row.get("orientation", orientation)
    if line_orientation is not None:
        line_orientation = axcodes(line_orientation, "'orientation'")
    case_id = row.get("id", default_id(image_path))
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"invalid 'id' {case_id!r}")
    line_region = row.get("region", region)
    return _case(
        image_path,
        normalize_labels(raw_labels),
        canonical_modality(raw_modality),
        case_id,
        str(line_region) if line_region is not None else None,
        line_orientation,
        number,
        path,
        str(row.get("dataset", "")),
    )


def _check_unique(cases: Sequence[Case], source: Path) -> None:
    from lorkd.inference.writer import safe_name

    seen: dict[str, str] = {}
    clashes = []
    for case in cases:
        name = safe_name(case.id, "case")
        if name in seen:
            clashes.append(f"{seen[name]!r} and {case.id!r} -> {name}")
        seen[name] = case.id
    if clashes:
        raise ValueError(
            f"{source}: several cases would write the same output folder: {'; '.join(clashes)} (give distinct 'id's)"
        )

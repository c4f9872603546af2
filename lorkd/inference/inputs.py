"""What ``python predict.py input=...`` predicts: a NIfTI file, a folder of NIfTI files and DICOM series
folders, one DICOM series folder, or a jsonl manifest (whose images may be DICOM series folders too).

Files and folders take ``labels`` and ``modality`` from the command line. A manifest line is
``{"image": ..., "label": [...], "modality": ..., "id"?, "region"?, "orientation"?}``, read by the
training and evaluation parser (:func:`lorkd.data.manifest.read_manifest` with the command line as
:class:`~lorkd.data.manifest.LineDefaults`), so a manifest may list images only. Lines with problems
(bad JSON, no labels, unknown modality, bad orientation) are reported together before anything runs;
an unreadable image is not checked here: it fails its own case only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lorkd.data.manifest import Case, LineDefaults, ManifestError, axcodes, default_id, read_manifest
from lorkd.io import safe_name
from lorkd.regions import canonical_modality, normalize_labels

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def folder_images(path: Path) -> list[Path]:
    """A DICOM series folder itself, or the NIfTI files and DICOM series folders in ``path`` (sorted by name)."""
    from lorkd.data.dicom import is_dicom_series

    if is_dicom_series(path):
        return [path]
    return sorted(p for p in path.iterdir() if (p.is_file() and is_nifti(p)) or is_dicom_series(p))


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
        defaults = LineDefaults(
            normalize_labels(labels) if labels is not None else None,
            canonical_modality(modality) if modality is not None else None,
            region,
            orientation,
        )
        cases, problems = read_manifest(path, require_masks=False, defaults=defaults)
        if problems:
            raise ManifestError(path, problems)
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
        ids = distinct_ids([default_id(f) for f in files])
        cases = [
            Case(f.resolve(), shared, mod, "", None, None, case_id, region, orientation, 0, path)
            for f, case_id in zip(files, ids)
        ]
    _check_unique(cases, path)
    return cases


def case_folder_name(case_id: str) -> str:
    """The folder of a case below ``output_dir``: its id's letters and digits (of every script) and ``._-``."""
    return safe_name(case_id, "case", unicode=True)


def distinct_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` (of files in one folder, so distinct) made distinct as folder names too: where several map to
    one folder, each id that its folder name does not spell exactly gets ``-`` and 8 hex digits of its sha256."""
    folders = Counter(case_folder_name(i) for i in ids)
    return [
        f"{i}-{hashlib.sha256(i.encode()).hexdigest()[:8]}"
        if folders[case_folder_name(i)] > 1 and case_folder_name(i) != i
        else i
        for i in ids
    ]


def _check_unique(cases: Sequence[Case], source: Path) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for case in cases:
        name = case_folder_name(case.id)
        if name in seen:
            clashes.append(f"{seen[name]!r} and {case.id!r} -> {name}")
        seen[name] = case.id
    if clashes:
        raise ValueError(
            f"{source}: several cases would write the same output folder: {'; '.join(clashes)} (give distinct 'id's)"
        )

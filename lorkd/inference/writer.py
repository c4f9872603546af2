"""Write a :class:`~lorkd.inference.predictor.Prediction` to a case folder, atomically and resumably.

A case folder holds ``<label>.nii.gz`` (uint8 per label), ``segmentation.nii.gz`` (multilabel),
``labels.json`` (id -> label), ``preview.png``, optionally ``probabilities/<label>.nii.gz`` and
``statistics.json`` (per-label volume and intensities), ``segmentation.dcm`` (DICOM-SEG) and, written
last, ``prediction.json``: the marker of a complete case (labels, files, per-label summary rows).
Every file is written to a temporary name and moved into place, so an interrupted run never leaves
a half-written file under a final name, and a case without its marker is simply predicted again
(its leftover ``.tmp-*`` files removed first). Writes stay inside the output folder: a case folder
or subfolder that is a symbolic link is refused, a planted file link is replaced, never followed;
stale files are removed only when the old marker lists them and they are the writer's own kind
(``*.nii.gz``, ``labels.json``, ``preview.png``) inside the case folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lorkd.data.image_reader import available_cores, read_voxels, reordered
from lorkd.inference.predictor import Prediction
from lorkd.inference.statistics import voxel_volume_ml
from lorkd.io import atomic_write, folder_inside, path_inside, remove_temporaries, safe_name, write_json

MARKER = "prediction.json"
SUMMARY_FIELDS = ("case", "label", "expert", "voxels", "volume_ml", "seconds", "status", "error")
_RESERVED = {"segmentation", "labels", "preview", "probabilities", "prediction", "statistics"}
PROBABILITIES = "probabilities"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"  # a whole PNG ends with its IEND chunk
# names this writer produces: the only files its stale-file cleanup may remove
_OWN_FILE = re.compile(r"^(probabilities/)?[A-Za-z0-9._-]+\.nii\.gz$|^labels\.json$|^preview\.png$|^statistics\.json$|^segmentation\.dcm$")


def label_file_names(labels: Sequence[str]) -> dict[str, str]:
    """Distinct safe stems per label, never one of the case folder's own file names."""
    used = set(_RESERVED)
    names: dict[str, str] = {}
    for i, label in enumerate(labels, start=1):
        stem = safe_name(label)
        if stem.lower() in used:
            stem = f"{stem}_{i}"
        used.add(stem.lower())
        names[label] = stem
    return names


def summary_rows(case: str, prediction: Prediction, seconds: float) -> list[dict[str, Any]]:
    """One row per label: voxels and volume (ml) of its mask, and the case's seconds."""
    ml = voxel_volume_ml(prediction.segmentation)
    rows = []
    for label in prediction.labels:
        voxels = int(np.count_nonzero(np.asarray(prediction.masks[label].dataobj)))
        rows.append(
            {
                "case": case,
                "label": label,
                "expert": prediction.routes[label],
                "voxels": voxels,
                "volume_ml": round(voxels * ml, 4),
                "seconds": round(seconds, 3),
                "status": "ok",
                "error": "",
            }
        )
    return rows


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a case folder, or None when absent or unreadable."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _loads(path: Path) -> bool:
    """``path`` is a regular file (not a link) whose content reads back (NIfTI voxels, JSON, PNG)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.name.endswith(".nii.gz") or path.suffix == ".nii":
            read_voxels(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".png":
            data = path.read_bytes()
            return data.startswith(_PNG_START) and data.endswith(_PNG_END)
        return path.stat().st_size > 0
    except Exception:  # nibabel, gzip, zlib: many error types for a damaged file
        return False


def completed(
    folder: Path, labels: Sequence[str], key: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The marker when ``folder`` holds a complete prediction of exactly ``labels`` (made for ``key``,
    the identity of the input and the run's settings, when given) whose files all exist and load; else None."""
    marker = read_marker(folder)
    if marker is None or marker.get("labels") != list(labels):
        return None
    if key is not None and marker.get("key") != key:
        return None
    for name in marker.get("files", []):
        path = path_inside(folder, name)
        if path is None or not _loads(path):
            return None
    return marker


def _remove_stale(folder: Path, names: set[str]) -> None:
    """Delete files of an earlier prediction: the writer's own kind, inside ``folder``, never a link."""
    for name in sorted(names):
        path = path_inside(folder, name) if _OWN_FILE.match(name) else None
        if path is not None and path.is_file() and not path.is_symlink():
            path.unlink()


_WRITERS = available_cores()


def save_nifti(image: nib.Nifti1Image, path: str | Path) -> None:
    """``nib.save`` with a 3-D array first copied into NIfTI's order by :func:`~lorkd.data.image_reader.reordered`
    (the same file: nibabel would otherwise reorder it slice by slice, several times slower)."""
    data = image.dataobj
    if isinstance(data, np.ndarray) and data.ndim == 3 and not data.flags.f_contiguous:
        image = type(image)(reordered(data, "F", threads=1), image.affine, image.header)  # writers: a file each
    nib.save(image, str(path))


def save_prediction(
    prediction: Prediction,
    folder: str | Path,
    case: str | None = None,
    preview: bool = True,
    probabilities: bool = True,
    metadata: dict[str, Any] | None = None,
    root: str | Path | None = None,
    statistics: bool = False,
    dicom_source: Path | None = None,
) -> dict[str, Any]:
    """Write every output of one image to ``folder`` (marker last) and return the marker.

    ``probabilities``: also write ``probabilities/<label>.nii.gz`` when the prediction has them.
    ``metadata`` is stored in the marker (e.g. the source image, checkpoint and resume key).
    ``root`` (default: ``folder``'s parent) is the folder no write may leave: :class:`~lorkd.io.UnsafePathError`.
    ``statistics``: also write ``statistics.json`` (:mod:`lorkd.inference.statistics`).
    ``dicom_source``: the DICOM series folder of the input; also write ``segmentation.dcm``, a DICOM
    Segmentation referencing it (:mod:`lorkd.inference.dicom_seg`).
    A write that fails (a full disk) removes the case's files before the error goes on: no partial case
    is left to fill the disk.
    """
    folder = Path(folder)
    folder = folder_inside(Path(root) if root is not None else folder.parent, folder)
    case = case or folder.name
    old = read_marker(folder)
    (folder / MARKER).unlink(missing_ok=True)  # the case is incomplete until the new marker is written
    remove_temporaries(folder)  # a killed run's partial files
    try:
        return _write_case(prediction, folder, case, preview, probabilities, metadata, statistics, dicom_source, old)
    except BaseException:  # a full disk, an interruption: leave no partial case behind (it holds no marker)
        _remove_partial(folder, prediction.labels, old)
        raise


def _remove_partial(folder: Path, labels: Sequence[str], old: dict[str, Any] | None) -> None:
    """Delete what a failed write of ``labels`` (or the earlier prediction of ``old``) left in ``folder``:
    the writer's own files only (:func:`_remove_stale`), then the folders left empty."""
    names = label_file_names(labels)
    mine = {f"{stem}.nii.gz" for stem in names.values()} | {f"{PROBABILITIES}/{stem}.nii.gz" for stem in names.values()}
    mine |= {"segmentation.nii.gz", "labels.json", "preview.png", "statistics.json", "segmentation.dcm"}
    with contextlib.suppress(OSError):  # the write's own error is the one to report
        _remove_stale(folder, mine | set((old or {}).get("files", [])))
    for empty in (folder / PROBABILITIES, folder):
        try:
            if empty.is_dir() and not empty.is_symlink():
                empty.rmdir()
        except OSError:  # not empty: files of the user's, another run's temporaries
            pass


def _write_case(
    prediction: Prediction,
    folder: Path,
    case: str,
    preview: bool,
    probabilities: bool,
    metadata: dict[str, Any] | None,
    statistics: bool,
    dicom_source: Path | None,
    old: dict[str, Any] | None,
) -> dict[str, Any]:
    """The writes of :func:`save_prediction` once ``folder`` is ready (marker last); returns the marker."""
    names = label_file_names(prediction.labels)
    files: list[str] = []

    def put(name: str, write: Callable[[Path], None]) -> None:
        atomic_write(folder / name, write)
        files.append(name)

    # NIfTI files and the preview are written side by side: gzip, the copies into NIfTI's order and Pillow's
    # encoder release the GIL, so the cores share the work
    with ThreadPoolExecutor(_WRITERS) as pool:
        drawing = None
        if preview:
            from lorkd.inference.preview import save_preview

            drawing = pool.submit(atomic_write, folder / "preview.png", lambda tmp: save_preview(prediction, tmp))

        def put_images(images: dict[str, nib.Nifti1Image]) -> None:
            # the multilabel map first: the slowest to compress (many values), it must not start last
            order = sorted(images, key=lambda name: name != "segmentation.nii.gz")
            done = [pool.submit(atomic_write, folder / name, lambda tmp, im=images[name]: save_nifti(im, tmp))
                    for name in order]  # fmt: skip
            for future in done:
                future.result()
            files.extend(images)

        put_images({f"{names[lab]}.nii.gz": prediction.masks[lab] for lab in prediction.labels}
                   | {"segmentation.nii.gz": prediction.segmentation})  # fmt: skip
        label_ids = {str(i): lab for i, lab in prediction.label_ids.items()}
        put("labels.json", lambda tmp: tmp.write_text(json.dumps(label_ids, indent=2) + "\n", encoding="utf-8"))
        if probabilities and prediction.probabilities is not None:
            folder_inside(folder, folder / PROBABILITIES)
            put_images({f"{PROBABILITIES}/{names[lab]}.nii.gz": prediction.probabilities[lab] for lab in prediction.labels})
        if drawing is not None:
            drawing.result()
            files.append("preview.png")
    if statistics:
        from lorkd.inference.statistics import STATISTICS, label_statistics

        stats = {"case": case, **label_statistics(prediction)}
        put(STATISTICS, lambda tmp: tmp.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8"))
    if dicom_source is not None:
        from lorkd.inference.dicom_seg import DICOM_SEG, write_dicom_seg

        put(DICOM_SEG, lambda tmp: write_dicom_seg(prediction, dicom_source, tmp))
    _remove_stale(folder, set((old or {}).get("files", [])) - set(files))
    marker = {
        "case": case,
        "labels": prediction.labels,
        "label_ids": label_ids,
        "label_files": {lab: f"{names[lab]}.nii.gz" for lab in prediction.labels},
        "routes": prediction.routes,
        "modality": prediction.modality,
        "files": files,
        "rows": summary_rows(case, prediction, prediction.seconds),
        **(metadata or {}),
    }
    write_json(folder / MARKER, marker)
    return marker


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``summary.csv``: one row per (case, label), and one per failed case."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)

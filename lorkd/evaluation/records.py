"""One record per evaluated case, stored as ``OUT/cases/<name>.json`` the moment the case finishes.

A record holds the case's metric rows (or the error that stopped it), the run fingerprint and the
digest of the case's inputs (:func:`input_digest`: the manifest line's labels, modality, region,
orientation and the identity of its image and mask files). Each file is written atomically by the
rank that evaluated the case, so an interrupted run leaves only complete records; a resumed run keeps
the successful records of its own fingerprint whose inputs are unchanged and evaluates the other
cases again (failed cases are retried, an edited line or a replaced mask is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorkd.data.manifest import Case, case_identity
from lorkd.io import folder_inside, write_text

log = logging.getLogger(__name__)

RECORD_DIR = "cases"
CaseKey = tuple[str, str]  # (dataset, case id)


@dataclass
class CaseRecord:
    """Result of one case: its (case, label) rows, or the error that stopped it."""

    dataset: str
    case: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    fingerprint: str = ""
    inputs: str = ""  # input_digest of the case

    @property
    def key(self) -> CaseKey:
        return self.dataset, self.case

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseRecord:
        return cls(
            dataset=str(data["dataset"]),
            case=str(data["case"]),
            rows=list(data.get("rows") or []),
            error=data.get("error"),
            seconds=float(data.get("seconds", 0.0)),
            fingerprint=str(data.get("fingerprint", "")),
            inputs=str(data.get("inputs", "")),
        )


def input_digest(case: Case) -> str:
    """Short hash of what a case's rows depend on besides the run (see the module docstring)."""
    text = json.dumps(case_identity(case), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _slug(text: str) -> str:
    # not io.safe_name: record file names are resume keys, and safe_name joins with "_" (this with "-"),
    # so an existing OUT/cases/ would no longer be found and every case would be evaluated again
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")[:60] or "x"


def records_folder(output_dir: str | Path) -> Path:
    """Create ``OUT/cases/`` (refusing a symbolic link there: :class:`~lorkd.io.UnsafePathError`)."""
    return folder_inside(output_dir, Path(output_dir) / RECORD_DIR)


def record_path(output_dir: str | Path, dataset: str, case: str) -> Path:
    """File of a case's record: readable slugs plus a hash, so distinct ids never share a file."""
    digest = hashlib.sha1(f"{dataset}\0{case}".encode()).hexdigest()[:10]
    return Path(output_dir) / RECORD_DIR / f"{_slug(dataset)}__{_slug(case)}__{digest}.json"


def save_record(output_dir: str | Path, record: CaseRecord) -> Path:
    """Write a record atomically (NaN kept as JSON ``NaN``) and return its path."""
    path = record_path(output_dir, record.dataset, record.case)
    records_folder(output_dir)  # never through a linked cases/ folder
    write_text(path, json.dumps(record.to_dict(), allow_nan=True) + "\n")
    return path


def load_records(
    output_dir: str | Path, fingerprint: str, inputs: Mapping[CaseKey, str]
) -> dict[CaseKey, CaseRecord]:
    """Successful records of ``fingerprint`` for the cases of ``inputs`` (case key -> its
    :func:`input_digest`) made from the same inputs; anything else is left to recompute."""
    found: dict[CaseKey, CaseRecord] = {}
    stale = 0
    for key in sorted(inputs):
        record = read_record(output_dir, key)
        if record is None:
            continue
        if record.fingerprint != fingerprint or record.inputs != inputs[key]:
            stale += 1
        elif record.ok:
            found[key] = record
    if stale:
        log.info(
            "%d stored case record(s) in %s were made with other settings, another model or other "
            "inputs (manifest line, image or mask files); recomputing them",
            stale,
            output_dir,
        )
    return found


def read_record(output_dir: str | Path, key: CaseKey) -> CaseRecord | None:
    """The stored record of case ``key``, None when there is none or it is unreadable (logged)."""
    path = record_path(output_dir, *key)
    if not path.is_file():
        return None
    try:
        record = CaseRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable record (%s); the case is evaluated again", path, exc)
        return None
    if record.key != key:
        log.warning("%s: record of %s, not %s; the case is evaluated again", path, record.key, key)
        return None
    return record

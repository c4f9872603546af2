"""Prediction as a :class:`~lorkd.inference.case_runner.CaseTask`: a case in, its folder of files out.

A case is done (kept, unless ``overwrite``) when its folder holds a complete prediction made for the
same key: the case's identity (image path, size and mtime_ns, labels, modality, region, orientation)
and the run's (checkpoint identity, model, options that change masks, files written), with every
listed file present and loading. A case that fails (unreadable image, not 3-D, NaN, RGB, a link
planted in its folder, ...) becomes an ``error`` outcome naming its file and the run goes on. At the
end ``<output_dir>/summary.csv`` lists every case's rows in input order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorkd.data.manifest import Case, case_identity
from lorkd.inference.case_runner import WindowProgress
from lorkd.inference.inputs import case_folder_name
from lorkd.inference.predictor import Prediction, Predictor
from lorkd.inference.writer import completed as complete_marker
from lorkd.inference.writer import save_prediction, write_summary
from lorkd.io import DiskFullError, disk_full, lock_path, printable

log = logging.getLogger(__name__)


@dataclass
class CaseOutcome:
    """What happened to one case: ``status`` is ``ok`` (``prediction`` set until saved), ``skipped`` or
    ``error``; ``rows`` are its summary rows."""

    case: Case
    folder: Path
    status: str
    prediction: Prediction | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def case_error(case: Case, exc: Exception) -> str:
    """One line naming the case's image and the problem (control characters of names escaped: :func:`printable`)."""
    image = str(case.image)
    message = str(exc).strip().replace(image, printable(image))  # a newline in the name must not cut the line
    text = printable(message.splitlines()[0]) if message else type(exc).__name__
    if isinstance(exc, DiskFullError) or printable(image) in text:
        return text
    return f"{printable(image)}: {type(exc).__name__}: {text}"


def case_folder(output_dir: str | Path, case: Case) -> Path:
    return Path(output_dir) / case_folder_name(case.id)


class PredictionTask:
    """Predict each case into ``output_dir/<case>/`` (:mod:`lorkd.inference.writer`), then ``summary.csv``.

    ``settings`` is the run's part of each case's resume key; ``preview``, ``save_probabilities``,
    ``statistics`` and ``format`` (``dicom_seg``: also ``segmentation.dcm`` for DICOM series inputs)
    choose the files written (``configs/predict.yaml``'s ``writer:``).
    """

    def __init__(
        self,
        predictor: Predictor,
        output_dir: str | Path,
        settings: Mapping[str, Any] | None = None,
        preview: bool = True,
        save_probabilities: bool = False,
        statistics: bool = False,
        format: str = "nifti",
    ) -> None:
        self.predictor = predictor
        self.output_dir = Path(output_dir)
        self.settings = dict(settings or {})
        self.preview = bool(preview)
        self.save_probabilities = bool(save_probabilities)
        self.statistics = bool(statistics)
        self.format = format

    @property
    def source(self) -> str:
        """The checkpoint's absolute path (recorded in each case's marker)."""
        return str(Path(self.predictor.model.source).resolve())

    def key(self, case: Case) -> dict[str, Any]:
        """The resume key of ``case`` in this run."""
        return {"case": case_identity(case), "run": self.settings}

    def finished(self, cases: Sequence[Case]) -> dict[int, CaseOutcome]:
        """Cases whose folder holds a complete prediction for the same key, as ``skipped`` outcomes."""
        found = {index: self.completed(case) for index, case in enumerate(cases)}
        return {index: outcome for index, outcome in found.items() if outcome is not None}

    def completed(self, case: Case) -> CaseOutcome | None:
        """A ``skipped`` outcome when the case's folder holds a complete prediction for the same key."""
        folder = case_folder(self.output_dir, case)
        marker = complete_marker(folder, case.labels, self.key(case))
        if marker is None:
            return None
        rows = [{**row, "status": "skipped"} for row in marker.get("rows", [])]
        return CaseOutcome(case, folder, "skipped", rows=rows)

    def lock_file(self, case: Case) -> Path:
        return lock_path(self.output_dir, case_folder(self.output_dir, case).name)

    def run(self, index: int, case: Case, rank: int, progress: WindowProgress) -> CaseOutcome:
        folder = case_folder(self.output_dir, case)
        meta = {"image": str(case.image), "checkpoint": self.source, "rank": rank, "key": self.key(case)}
        outcome = CaseOutcome(case, folder, "ok", metadata=meta)
        try:
            if self.format == "dicom_seg":  # what the DICOM-SEG writer needs, before the network runs
                from lorkd.inference.dicom_seg import check_source

                check_source(case.image)
            outcome.prediction = self.predictor.predict(
                case.image,
                case.labels,
                case.modality,
                region=case.region,
                orientation=case.orientation,
                return_probabilities=self.save_probabilities,
                progress=progress,
            )
        except Exception as exc:  # any failure of one case (CaseError names the file) must not stop the others
            self._fail(outcome, exc)
        return outcome

    def save(self, outcome: CaseOutcome) -> CaseOutcome:
        if outcome.status == "ok":
            try:
                marker = save_prediction(
                    outcome.prediction,
                    outcome.folder,
                    case=outcome.folder.name,
                    preview=self.preview,
                    probabilities=self.save_probabilities,
                    metadata=outcome.metadata,
                    root=self.output_dir,
                    statistics=self.statistics,
                    dicom_source=Path(outcome.case.image) if self.format == "dicom_seg" else None,
                )
                outcome.rows = marker["rows"]
            except Exception as exc:  # a link planted in the folder, a full disk: this case fails, not the run
                if disk_full(exc):  # its partial files are gone (save_prediction): say so in one line
                    exc = DiskFullError(outcome.folder, f"case {outcome.case.id} not written, its partial files removed")
                self._fail(outcome, exc)
            outcome.prediction = None  # free the volumes now
        if outcome.status == "error":
            log.error("case %s failed: %s", printable(outcome.case.id), printable(outcome.rows[0]["error"]))
        return outcome

    @staticmethod
    def _fail(outcome: CaseOutcome, exc: Exception) -> None:
        outcome.status = "error"
        outcome.rows = [{"case": outcome.folder.name, "status": "error", "error": case_error(outcome.case, exc)}]

    def finish(self, outcomes: Sequence[CaseOutcome], kept: int) -> list[dict[str, Any]]:
        """Write ``summary.csv`` and log the counts and each failure; returns the summary rows."""
        rows = [row for outcome in outcomes for row in outcome.rows]
        path = self.output_dir / "summary.csv"
        try:
            write_summary(path, rows)
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(self.output_dir, f"{path.name} not written") from exc
            raise
        counts = Counter(outcome.status for outcome in outcomes)
        log.info(
            "%d case(s): %d predicted, %d skipped (already complete), %d failed; summary: %s",
            len(outcomes), counts["ok"], counts["skipped"], counts["error"], printable(path),
        )  # fmt: skip
        for row in rows:
            if row["status"] == "error":
                log.warning("failed case %s: %s", printable(row["case"]), printable(row["error"]))
        return rows

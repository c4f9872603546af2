"""Evaluation as a :class:`~lorkd.inference.case_runner.CaseTask`: a case in, its metric record out.

* done (kept, unless ``overwrite``): a successful record in ``OUT/cases/`` of the same run
  fingerprint and unchanged inputs (:func:`~lorkd.evaluation.records.load_records`);
* run: the Predictor's masks against the manifest's (:func:`~lorkd.evaluation.scoring.evaluate_record`),
  a failing case a record holding its error;
* save: the record, atomically, the moment the case is done (an interrupted run resumes from there);
* finish (rank 0, every record of the run, kept ones included): ``per_case.csv``, ``summary.json``,
  ``report.md`` and ``dice_by_region.png`` (:func:`~lorkd.evaluation.outputs.write_outputs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd.data.manifest import Case
from lorkd.evaluation.outputs import write_outputs
from lorkd.evaluation.records import (
    CaseRecord,
    input_digest,
    load_records,
    read_record,
    record_path,
    records_folder,
    save_record,
)
from lorkd.evaluation.scoring import evaluate_record
from lorkd.evaluation.settings import MetricSettings
from lorkd.inference.case_runner import WindowProgress
from lorkd.inference.predictor import Predictor
from lorkd.io import DiskFullError, disk_full, lock_path, printable
from lorkd.regions import RegionMap

log = logging.getLogger(__name__)


def model_info(
    predictor: Predictor, checkpoint: str | Path, fingerprint: str, name: str | None = None
) -> dict[str, Any]:
    """Name, kind, the file whose weights are evaluated (the teacher's own file for a LoRKD
    checkpoint's teacher, with its sha256 prefix and the LoRKD checkpoint it was reached through),
    experts and parameter count of the evaluated model (for the reports)."""
    loaded = predictor.model
    info = {
        "name": name or ("lorkd" if loaded.network == "experts" else "teacher"),
        "network": loaded.network,
        "checkpoint": str(Path(loaded.source or checkpoint).resolve()),
        "experts": list(loaded.experts),
        "parameter_count": int(loaded.parameter_count),
        "fingerprint": fingerprint,
    }
    if loaded.fingerprint:
        info["checkpoint_sha256"] = loaded.fingerprint
    if loaded.loaded_from:
        info["loaded_from"] = str(Path(loaded.loaded_from).resolve())
    return info


def _number(value: Any) -> float:
    """A summary value for ``%.4f`` (None, when no case succeeded, prints as nan)."""
    return float("nan") if value is None else float(value)


class EvaluationTask:
    """Evaluate each case into ``output_dir`` (see the module docstring).

    ``model`` (:func:`model_info`) and ``problems`` (manifest lines that could not be read, as failed
    cases) go into the reports; ``region_map`` gives regions and report groups when the checkpoint has
    none (official SAT files); ``compare``: another evaluation's output folder for a side-by-side table.
    """

    def __init__(
        self,
        output_dir: str | Path,
        predictor: Predictor,
        settings: MetricSettings,
        fingerprint: str,
        model: Mapping[str, Any],
        region_map: RegionMap | None = None,
        problems: Sequence[Mapping[str, Any]] = (),
        compare: str | Path | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.predictor = predictor
        self.settings = settings
        self.fingerprint = fingerprint
        self.model = dict(model)
        self.region_map = predictor.model.region_map or region_map
        self.problems = [dict(p) for p in problems]
        self.compare = Path(compare) if compare else None

    def finished(self, cases: Sequence[Case]) -> dict[int, CaseRecord]:
        """Successful records of an earlier run with this fingerprint and the same inputs."""
        if self.problems:
            log.info("%d unreadable manifest line(s), reported as failed cases", len(self.problems))
        found = load_records(self.output_dir, self.fingerprint, {(c.dataset, c.id): input_digest(c) for c in cases})
        return {i: found[(c.dataset, c.id)] for i, c in enumerate(cases) if (c.dataset, c.id) in found}

    def completed(self, case: Case) -> CaseRecord | None:
        """The successful record another run stored for ``case`` with this fingerprint and its inputs."""
        record = read_record(self.output_dir, (case.dataset, case.id))
        if record is None or not record.ok or (record.fingerprint, record.inputs) != (self.fingerprint, input_digest(case)):
            return None
        return record

    def lock_file(self, case: Case) -> Path:
        return lock_path(self.output_dir, record_path(self.output_dir, case.dataset, case.id).stem)

    def run(self, index: int, case: Case, rank: int, progress: WindowProgress) -> CaseRecord:
        record = evaluate_record(self.predictor, case, self.settings, self.region_map, self.fingerprint)
        if record.ok:
            dice = [r["dice"] for r in record.rows if not math.isnan(r["dice"])]
            log.info(
                "rank %d: %s/%s %d label(s), mean Dice %.4f (%.1f s)",
                rank, printable(record.dataset), printable(record.case), len(record.rows), sum(dice) / max(len(dice), 1), record.seconds,
            )  # fmt: skip
        return record

    def save(self, record: CaseRecord) -> CaseRecord:
        """Store the record; on a full disk it is not stored (one line), it still counts in the reports
        and the case is evaluated again by a resumed run."""
        try:
            save_record(self.output_dir, record)
        except OSError as exc:
            if not disk_full(exc):
                raise
            log.error("%s", DiskFullError(records_folder(self.output_dir), f"record of {record.dataset}/{record.case} not stored"))
        return record

    def finish(self, records: Sequence[CaseRecord], kept: int) -> dict[str, Any]:
        """Write the reports; returns the summary."""
        try:
            summary = write_outputs(self.output_dir, records, self.settings, self.model, self.problems, self.compare)
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(self.output_dir, "the reports were not written") from exc
            raise
        overall = summary["overall"]
        log.info(
            "evaluated %d case(s) (%d now, %d kept from an earlier run, %d failed): Dice %.4f, NSD %.4f -> %s",
            summary["n_cases"], len(records) - kept, kept, summary["n_failed_cases"],
            _number(overall["dice"]), _number(overall["nsd"]), printable(self.output_dir),
        )  # fmt: skip
        return summary

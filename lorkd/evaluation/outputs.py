"""The files of an evaluation: ``per_case.csv``, ``summary.json``, ``report.md``, ``dice_by_region.png``.

Built on rank 0 from every case record of the run (this run's and those kept from an earlier one).
Rows are sorted by (dataset, case, label) and de-duplicated, so the files do not depend on how the
cases were spread over processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd.evaluation.records import CaseRecord
from lorkd.evaluation.report import (
    deduplicate,
    plot_dice_by_region,
    render_markdown,
    row_key,
    summarise,
    write_per_case_csv,
    write_summary_json,
)
from lorkd.evaluation.settings import MetricSettings
from lorkd.io import write_text

PER_CASE = "per_case.csv"
SUMMARY = "summary.json"
REPORT = "report.md"
PLOT = "dice_by_region.png"


def build_summary(
    records: Sequence[CaseRecord],
    settings: MetricSettings,
    model: Mapping[str, Any],
    problems: Sequence[Mapping[str, Any]] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, sorted unique rows) of the records; failed records and ``problems`` (manifest lines
    that could not be read) become the summary's ``errors``."""
    rows = sorted((row for r in records if r.ok for row in r.rows), key=row_key)
    summary = summarise(
        rows, settings.empty_rule, settings.tolerance_mm, settings.space, settings.tolerance_overrides
    )
    errors = [{"dataset": r.dataset, "case": r.case, "error": r.error} for r in records if not r.ok]
    errors = sorted(errors, key=lambda e: (e["dataset"], e["case"])) + [dict(p) for p in problems]
    summary["model"] = dict(model)
    summary["errors"] = errors
    summary["n_failed_cases"] = len(errors)
    summary["case_seconds"] = round(sum(r.seconds for r in records), 3)
    return summary, deduplicate(rows)


def load_summary(output_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of another evaluation (for ``compare=``); a clear error when missing."""
    path = Path(output_dir) / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"compare={output_dir}: no {SUMMARY} there (evaluate into that folder first)")
    return json.loads(path.read_text(encoding="utf-8"))


def comparison_names(
    summary: Mapping[str, Any], other: Mapping[str, Any], other_dir: str | Path
) -> tuple[str, str]:
    """Display names of two evaluations: their model names, or folder names when those coincide."""
    mine = str((summary.get("model") or {}).get("name") or "this")
    theirs = str((other.get("model") or {}).get("name") or Path(other_dir).name)
    if mine == theirs:
        theirs = Path(other_dir).resolve().name
        mine = mine if mine != theirs else f"{mine} (this)"
    return mine, theirs


def write_outputs(
    output_dir: str | Path,
    records: Sequence[CaseRecord],
    settings: MetricSettings,
    model: Mapping[str, Any],
    problems: Sequence[Mapping[str, Any]] = (),
    compare: str | Path | None = None,
) -> dict[str, Any]:
    """Write the four report files (each atomically) and return the summary."""
    out = Path(output_dir)
    summary, rows = build_summary(records, settings, model, problems)
    other, names, params = None, (str(model.get("name", "this")), "other"), None
    if compare is not None:
        other = load_summary(compare)
        names = comparison_names(summary, other, compare)
        counts = {
            names[0]: summary["model"].get("parameter_count"),
            names[1]: (other.get("model") or {}).get("parameter_count"),
        }
        params = {k: int(v) for k, v in counts.items() if v is not None}
        summary["compare"] = {"path": str(Path(compare).resolve()), "name": names[1]}
    write_per_case_csv(rows, out / PER_CASE)
    write_summary_json(summary, out / SUMMARY)
    write_text(out / REPORT, render_markdown(summary, other, names, params))
    plot_dice_by_region(summary, out / PLOT, other, names)
    return summary

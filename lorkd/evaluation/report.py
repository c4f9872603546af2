"""Per-case rows -> SAT-style aggregates, CSV/JSON/Markdown/PNG reports.

A row is one (case, label): ``dataset, case, label, region, modality, group, tp, fp, fn, n_pred,
n_ref, dice, nsd`` where ``group`` is ``"abnormal"`` for lesions and the region otherwise
(``RegionMap.report_group``). Aggregation follows SAT's evaluation and merge scripts:

1. label: mean over cases per (dataset, modality, label);
2. dataset: macro mean over its labels;
3. ``mod_label`` (``f"{modality}_{label}"``): mean over the datasets that contain it;
4. group (region, or ``"abnormal"`` for lesions): mean over its mod_labels;
5. ``"All"``: mean over all mod_labels.

Every mean skips NaN (the ``nnunet`` empty rule's "not defined").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lorkd.io import atomic_write, write_text
from lorkd.regions import mod_label

Row = dict[str, Any]

METRICS: tuple[str, ...] = ("dice", "nsd")
CSV_FIELDS: tuple[str, ...] = (
    "dataset", "case", "label", "region", "modality", "group",
    "tp", "fp", "fn", "n_pred", "n_ref", "dice", "nsd",
)  # fmt: skip
_INT_FIELDS = frozenset({"tp", "fp", "fn", "n_pred", "n_ref"})
_FLOAT_FIELDS = frozenset(METRICS)
ABNORMAL = "abnormal"
OVERALL = "All"
EMPTY_RULE_TEXT = {
    "sat": "sat (reference and prediction empty -> 1; only one empty -> 0)",
    "nnunet": "nnunet (reference empty -> NaN, excluded from means; prediction empty -> 0)",
}


# --------------------------------------------------------------------------- rows


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """Identity of a row: (dataset, case, label)."""
    return str(row["dataset"]), str(row["case"]), str(row["label"])


def deduplicate(rows: Iterable[Row]) -> list[Row]:
    """Rows with a unique (dataset, case, label), keeping the first occurrence."""
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def write_per_case_csv(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Write rows as CSV: the ``CSV_FIELDS`` columns, then any extra keys sorted (empty where a row lacks one)."""
    extra = sorted({k for row in rows for k in row} - set(CSV_FIELDS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _parse(field: str, value: str) -> Any:
    if field in _INT_FIELDS:
        return int(value)
    if field in _FLOAT_FIELDS:
        return float(value)
    return value


def read_per_case_csv(path: str | os.PathLike) -> list[Row]:
    """Rows of a ``write_per_case_csv`` file (counts as int, metrics as float, NaN kept)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- aggregation


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    arr = np.asarray([float(v) for v in values], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _group_by(items: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    groups: dict[Any, list[Row]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _means(items: Sequence[Row]) -> dict[str, float]:
    return {m: _nanmean(item[m] for item in items) for m in METRICS}


def _single(items: Sequence[Row], field: str, what: str) -> str:
    """The one value of ``field`` shared by ``items``; ValueError when they disagree."""
    values = sorted({str(item[field]) for item in items})
    if len(values) != 1:
        raise ValueError(f"{what} has several {field} values: {values}")
    return values[0]


def _group_order(group: str) -> tuple[bool, str]:
    return group == ABNORMAL, group


def aggregate(rows: Iterable[Row]) -> dict[str, Any]:
    """SAT aggregation of de-duplicated rows: per_label, per_dataset, per_mod_label, per_group, overall."""
    rows = list(rows)
    cases_of = {d: {r["case"] for r in rs} for d, rs in _group_by(rows, lambda r: r["dataset"]).items()}
    by_label = _group_by(rows, lambda r: (r["dataset"], r["modality"], r["label"]))
    per_label = []
    for (dataset, modality, label), cases in sorted(by_label.items()):
        per_label.append(
            {
                "dataset": dataset,
                "modality": modality,
                "label": label,
                "mod_label": mod_label(cases[0]["modality"], cases[0]["label"]),
                "group": _single(cases, "group", f"label {dataset}/{label}"),
                "n_cases": len(cases),
                **_means(cases),
            }
        )
    per_dataset = [
        {
            "dataset": dataset,
            "modalities": ",".join(sorted({lab["modality"] for lab in labels})),
            "n_labels": len(labels),
            "n_cases": len(cases_of[dataset]),
            **_means(labels),
        }
        for dataset, labels in sorted(_group_by(per_label, lambda lab: lab["dataset"]).items())
    ]
    per_mod_label = [
        {
            "mod_label": key,
            "group": _single(labels, "group", f"mod_label {key}"),
            "n_datasets": len(labels),
            **_means(labels),
        }
        for key, labels in sorted(_group_by(per_label, lambda lab: lab["mod_label"]).items())
    ]
    by_group = _group_by(per_mod_label, lambda ml: ml["group"])
    per_group = [
        {"group": group, "n_mod_labels": len(by_group[group]), **_means(by_group[group])}
        for group in sorted(by_group, key=_group_order)
    ]
    overall = {"group": OVERALL, "n_mod_labels": len(per_mod_label), **_means(per_mod_label)}
    return {
        "per_label": per_label,
        "per_dataset": per_dataset,
        "per_mod_label": per_mod_label,
        "per_group": per_group,
        "overall": overall,
    }


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def summarise(
    rows: Iterable[Row],
    empty_rule: str,
    tolerance: float,
    space: str,
    tolerance_overrides: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """JSON-serialisable summary: evaluation settings, counts and the SAT aggregates (NaN -> None).

    Duplicated (dataset, case, label) rows count once.
    """
    rows = list(rows)
    unique = deduplicate(rows)
    summary = {
        "empty_rule": empty_rule,
        "nsd_tolerance_mm": float(tolerance),
        "nsd_tolerance_overrides_mm": {k: float(v) for k, v in (tolerance_overrides or {}).items()},
        "space": space,
        "n_rows": len(unique),
        "n_duplicates_dropped": len(rows) - len(unique),
        "n_cases": len({(r["dataset"], r["case"]) for r in unique}),
        **aggregate(unique),
    }
    return _json_safe(summary)


def write_summary_json(summary: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a ``summarise`` result as indented strict JSON, atomically."""
    write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _delta(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a - b:+.4f}"


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in cells) + " |" for cells in body]
    return lines + [""]


def _groups_with_overall(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*summary["per_group"], summary["overall"]]


def _settings(summary: Mapping[str, Any]) -> str:
    rule = EMPTY_RULE_TEXT.get(summary["empty_rule"], summary["empty_rule"])
    tolerance = f"{summary['nsd_tolerance_mm']:g} mm"
    overrides = summary.get("nsd_tolerance_overrides_mm") or {}
    if overrides:
        tolerance += " (overrides: " + ", ".join(f"{k} {v:g} mm" for k, v in sorted(overrides.items())) + ")"
    return f"empty-mask rule {rule}; NSD tolerance {tolerance}; evaluation space {summary['space']}"


def _format_params(count: int | None) -> str:
    return "–" if count is None else f"{count:,} ({count / 1e6:.2f} M)"


def _compare_section(
    summary: Mapping[str, Any],
    other: Mapping[str, Any],
    names: tuple[str, str],
    param_counts: Mapping[str, int] | None,
) -> list[str]:
    a, b = names
    lines = [f"## Comparison per region: {a} vs {b}", ""]
    if _settings(summary) != _settings(other):
        lines += [f"**Settings differ** — {b}: {_settings(other)}", ""]
    if param_counts:
        lines += [f"- Parameters: {name} {_format_params(param_counts.get(name))}" for name in names] + [""]
    theirs = {g["group"]: g for g in _groups_with_overall(other)}
    mine = {g["group"]: g for g in _groups_with_overall(summary)}
    order = [g["group"] for g in summary["per_group"]]
    order += sorted((set(theirs) - set(mine)), key=_group_order) + [OVERALL]
    header = ["group", f"Dice {a}", f"Dice {b}", "ΔDice", f"NSD {a}", f"NSD {b}", "ΔNSD"]
    body = []
    for group in order:
        x, y = mine.get(group, {}), theirs.get(group, {})
        cells = [group]
        for m in METRICS:
            cells += [x.get(m), y.get(m), _delta(x.get(m), y.get(m))]
        body.append(cells)
    return lines + _table(header, body)


def render_comparison(
    summary: Mapping[str, Any],
    other: Mapping[str, Any],
    names: tuple[str, str] = ("this", "other"),
    param_counts: Mapping[str, int] | None = None,
) -> str:
    """The per-region side-by-side section of :func:`render_markdown` alone (e.g. to print)."""
    return "\n".join(_compare_section(summary, other, names, param_counts))


def _model_line(model: Mapping[str, Any]) -> str:
    parts = [f"Model: {model.get('name', '?')} ({model.get('network', model.get('kind', '?'))})"]
    if model.get("checkpoint"):
        sha = f" (sha256 {model['checkpoint_sha256']}…)" if model.get("checkpoint_sha256") else ""
        parts.append(f"checkpoint `{model['checkpoint']}`{sha}")
    if model.get("loaded_from"):
        parts.append(f"the teacher recorded in `{model['loaded_from']}`")
    if model.get("parameter_count") is not None:
        parts.append(f"{_format_params(model['parameter_count'])} parameters")
    return ", ".join(parts) + "."


def _errors_section(errors: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"## Failed cases ({len(errors)}, not in the tables above)", ""]
    body = [
        [e.get("dataset") or "–", e.get("case") or "–", " ".join(str(e["error"]).split()).replace("|", "\\|")]
        for e in errors
    ]
    return lines + _table(["dataset", "case", "error"], body)


def render_markdown(
    summary: Mapping[str, Any],
    compare: Mapping[str, Any] | None = None,
    names: tuple[str, str] = ("this", "other"),
    param_counts: Mapping[str, int] | None = None,
) -> str:
    """Markdown report of a ``summarise`` result; with ``compare`` (another summary) a per-region
    side-by-side table with deltas (first name minus second) and the ``param_counts`` of each name.

    Optional summary keys: ``model`` (name, kind, checkpoint, parameter_count) adds a line under the
    title; ``errors`` (dataset, case, error) lists the cases that could not be evaluated.
    """
    lines = ["# Evaluation report", ""]
    if summary.get("model"):
        lines.append(_model_line(summary["model"]))
    lines += [
        f"Settings: {_settings(summary)}.",
        f"{summary['n_cases']} cases, {summary['n_rows']} (case, label) rows"
        f"; duplicate rows dropped: {summary['n_duplicates_dropped']}.",
        "",
    ]
    if compare is not None:
        lines += _compare_section(summary, compare, names, param_counts)
    lines += ["## Overall and per region (lesions in 'abnormal')", ""]
    lines += _table(
        ["group", "mod_labels", "Dice", "NSD"],
        [[g["group"], g["n_mod_labels"], g["dice"], g["nsd"]] for g in _groups_with_overall(summary)],
    )
    lines += ["## Per dataset (macro mean over labels)", ""]
    lines += _table(
        ["dataset", "modality", "labels", "cases", "Dice", "NSD"],
        [
            [d["dataset"], d["modalities"], d["n_labels"], d["n_cases"], d["dice"], d["nsd"]]
            for d in summary["per_dataset"]
        ],
    )
    lines += ["## Per label (modality_label, mean over datasets)", ""]
    lines += _table(
        ["mod_label", "group", "datasets", "Dice", "NSD"],
        [
            [m["mod_label"], m["group"], m["n_datasets"], m["dice"], m["nsd"]]
            for m in summary["per_mod_label"]
        ],
    )
    lines += ["## Per dataset and label (mean over cases)", ""]
    lines += _table(
        ["dataset", "label", "group", "cases", "Dice", "NSD"],
        [
            [x["dataset"], x["label"], x["group"], x["n_cases"], x["dice"], x["nsd"]]
            for x in summary["per_label"]
        ],
    )
    if summary.get("errors"):
        lines += _errors_section(summary["errors"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_dice_by_region(
    summary: Mapping[str, Any],
    path: str | os.PathLike,
    compare: Mapping[str, Any] | None = None,
    names: tuple[str, str] = ("this", "other"),
) -> None:
    """Bar chart (PNG) of Dice per region, "abnormal" and "All"; grouped bars with ``compare``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [(names[0], summary)] + ([(names[1], compare)] if compare is not None else [])
    groups = [g["group"] for g in summary["per_group"]]
    if compare is not None:
        groups += sorted({g["group"] for g in compare["per_group"]} - set(groups), key=_group_order)
    groups.append(OVERALL)
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * len(series)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (name, s) in enumerate(series):
        values = {g["group"]: g["dice"] for g in _groups_with_overall(s)}
        heights = [np.nan if values.get(g) is None else values[g] for g in groups]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice by region ({summary['empty_rule']} rule, {summary['space']} space)")
    ax.grid(axis="y", alpha=0.3)
    if compare is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))

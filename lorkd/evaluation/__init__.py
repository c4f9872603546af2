"""Evaluation: per (case, label) metrics and SAT-style report aggregation (numpy/scipy only)."""

from lorkd.evaluation.metrics import (
    EMPTY_RULES,
    case_label_metrics,
    confusion_counts,
    dice,
    nsd,
    surface_distances,
    surfel_area_table,
    tolerance_for,
)
from lorkd.evaluation.report import (
    CSV_FIELDS,
    aggregate,
    deduplicate,
    mod_label,
    plot_dice_by_region,
    read_per_case_csv,
    render_comparison,
    render_markdown,
    row_key,
    summarise,
    write_per_case_csv,
    write_summary_json,
)

__all__ = [
    "CSV_FIELDS",
    "EMPTY_RULES",
    "aggregate",
    "case_label_metrics",
    "confusion_counts",
    "deduplicate",
    "dice",
    "mod_label",
    "nsd",
    "plot_dice_by_region",
    "read_per_case_csv",
    "render_comparison",
    "render_markdown",
    "row_key",
    "summarise",
    "surface_distances",
    "surfel_area_table",
    "tolerance_for",
    "write_per_case_csv",
    "write_summary_json",
]

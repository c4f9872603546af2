"""Metric rows of one case: per label, counts, Dice and NSD with the region and report group."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lorkd.evaluation.metrics import case_label_metrics
from lorkd.evaluation.settings import MetricSettings
from lorkd.regions import RegionMap, mod_label

UNKNOWN = "unknown"


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns (oblique-safe)."""
    lengths = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(lengths[0]), float(lengths[1]), float(lengths[2])


def region_and_group(
    label: str, modality: str, region_map: RegionMap | None, forced_region: str | None = None
) -> tuple[str, str]:
    """(expert region, report group) of a prompt.

    The region is the case's forced ``region`` or the label's region; the group is SAT's: "abnormal"
    for lesions, else the label's region (by label only, so one label has one group everywhere).
    """
    if region_map is None:
        return forced_region or UNKNOWN, UNKNOWN
    region = forced_region or region_map.label_region.get(mod_label(modality, label), UNKNOWN)
    return region, region_map.report_group(label, modality)


def case_rows(
    dataset: str,
    case: str,
    modality: str,
    labels: Sequence[str],
    masks: Iterable[tuple[np.ndarray, np.ndarray]],
    spacing: Sequence[float],
    settings: MetricSettings,
    region_map: RegionMap | None = None,
    forced_region: str | None = None,
) -> list[dict[str, Any]]:
    """One row per label from its (prediction, reference) masks, one 3-D pair per label in label order.

    ``masks`` may be a generator, so a case with many labels never holds all of them twice.
    """
    spacing_text = "x".join(f"{s:g}" for s in spacing)
    rows = []
    for label, (pred, ref) in zip(labels, masks, strict=True):
        tolerance = settings.tolerance(label)
        region, group = region_and_group(label, modality, region_map, forced_region)
        rows.append(
            {
                "dataset": dataset,
                "case": case,
                "label": label,
                "region": region,
                "modality": modality,
                "group": group,
                **case_label_metrics(pred, ref, spacing, tolerance, settings.empty_rule),
                "tolerance_mm": tolerance,
                "spacing_mm": spacing_text,
            }
        )
    return rows

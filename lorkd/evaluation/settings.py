"""Evaluation settings (the ``metrics:`` block of ``configs/eval.yaml``) and the fingerprint of a run.

A run's fingerprint covers everything that changes a metric row: the settings, the model file and
kind, and the inference options that change masks. Rows stored under another fingerprint are
recomputed on resume, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorkd.evaluation.metrics import EMPTY_RULES, tolerance_for
from lorkd.regions import normalize_label

SPACES: tuple[str, ...] = ("original", "preprocessed")


@dataclass(frozen=True)
class MetricSettings:
    """Where and how masks are compared.

    ``space``: ``original`` (the input grid and its header spacing) or ``preprocessed`` (SAT's
    reoriented 1x1x3 mm grid, prediction and reference both there). ``tolerance_overrides`` maps a
    label name to its own NSD tolerance in mm (e.g. FLARE's ``{liver: 5}``).
    """

    space: str = "original"
    empty_rule: str = "sat"
    tolerance_mm: float = 1.0
    tolerance_overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"metrics.space must be one of {SPACES}, got {self.space!r}")
        if self.empty_rule not in EMPTY_RULES:
            raise ValueError(f"metrics.empty_rule must be one of {EMPTY_RULES}, got {self.empty_rule!r}")
        overrides = {normalize_label(k): float(v) for k, v in dict(self.tolerance_overrides).items()}
        if float(self.tolerance_mm) <= 0 or any(v <= 0 for v in overrides.values()):
            raise ValueError(
                f"NSD tolerances must be > 0 mm, got {self.tolerance_mm} and overrides {overrides}"
            )
        object.__setattr__(self, "tolerance_mm", float(self.tolerance_mm))
        object.__setattr__(self, "tolerance_overrides", overrides)

    @classmethod
    def coerce(cls, value: MetricSettings | Mapping[str, Any] | None) -> MetricSettings:
        """Accept settings, a plain/OmegaConf mapping (from Hydra) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        data = dict(value)
        unknown = sorted(set(data) - {"space", "empty_rule", "tolerance_mm", "tolerance_overrides"})
        if unknown:
            raise ValueError(f"unknown metrics key(s) {unknown}")
        if data.get("tolerance_overrides") is not None:
            data["tolerance_overrides"] = dict(data["tolerance_overrides"])
        else:
            data.pop("tolerance_overrides", None)
        return cls(**data)

    def tolerance(self, label: str) -> float:
        """NSD tolerance of ``label`` in mm."""
        return tolerance_for(normalize_label(label), self.tolerance_mm, self.tolerance_overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "empty_rule": self.empty_rule,
            "tolerance_mm": self.tolerance_mm,
            "tolerance_overrides": dict(sorted(self.tolerance_overrides.items())),
        }


def run_fingerprint(
    settings: MetricSettings, checkpoint: Mapping[str, Any], model: str, inference: Mapping[str, Any]
) -> str:
    """Short hash of what determines the metric rows of a run (see the module docstring); ``checkpoint``
    is the identity of the model loaded (:attr:`~lorkd.checkpoints.loading.LoadedModel.identity`)."""
    payload = {
        "metrics": settings.to_dict(),
        "checkpoint": dict(checkpoint),
        "model": model,
        "inference": {k: inference[k] for k in sorted(inference)},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

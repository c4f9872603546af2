"""Which network segments each prompt: group a case's labels by region expert.

A LoRKD model runs each label with the expert of its region (region map, modality-aware); a forced
``region`` sends every label to that expert. A label that the map does not know, or whose region has
no expert (SAT's ``whole_body``), is an error unless ``fallback`` names who segments it instead:
``"base"`` (the student's shared weights W0, no expert) or ``"teacher"``. A model without experts
(a SAT teacher, an official SAT file) runs every label itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lorkd.labels import HINT as LABELS_HINT
from lorkd.regions import RegionMap, UnknownLabelError, canonical_modality, normalize_label

FALLBACKS = (None, "base", "teacher")
_FALLBACK_HINT = (
    "; or segment it anyway with routing.fallback=base (the student's shared weights) or "
    "routing.fallback=teacher (Predictor: fallback='base' / 'teacher')"
    f"; {LABELS_HINT}"
)


@dataclass
class PromptGroup:
    """Labels segmented by one network pass: ``route`` is ``"model"`` (no experts), an expert name,
    ``"base"`` or ``"teacher"``; ``expert`` is the expert index to route to (-1: shared base, None: no routing)."""

    route: str
    expert: int | None
    indices: list[int] = field(default_factory=list)


def check_fallback(fallback: str | None) -> str | None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    return fallback


def plan_groups(
    labels: Sequence[str],
    modality: str,
    experts: Sequence[str],
    region_map: RegionMap | None,
    region: str | None = None,
    fallback: str | None = None,
    source: str = "the model",
) -> list[PromptGroup]:
    """Group label indices by the network that segments them, in order of first appearance."""
    check_fallback(fallback)
    if not experts:
        return [PromptGroup("model", None, list(range(len(labels))))]
    if region_map is None:
        raise ValueError(f"{source} has region experts but no region map to route labels with")
    modality = canonical_modality(modality)
    forced = _forced_expert(region, experts, source)
    groups: dict[str, PromptGroup] = {}
    for i, label in enumerate(labels):
        if forced is not None:
            route, index = experts[forced], forced
        else:
            route, index = _route_of(normalize_label(label), modality, experts, region_map, fallback, source)
        groups.setdefault(route, PromptGroup(route, index)).indices.append(i)
    return list(groups.values())


def _forced_expert(region: str | None, experts: Sequence[str], source: str) -> int | None:
    if region is None:
        return None
    name = str(region).strip().lower().replace(" ", "_")
    if name not in experts:
        raise ValueError(f"region {region!r} has no expert in {source}; expected one of {list(experts)}")
    return list(experts).index(name)


def _route_of(
    label: str,
    modality: str,
    experts: Sequence[str],
    region_map: RegionMap,
    fallback: str | None,
    source: str,
) -> tuple[str, int | None]:
    try:
        region = region_map.region_of(label, modality)
    except UnknownLabelError as exc:
        if fallback is None:
            raise UnknownLabelError(f"{exc}{_FALLBACK_HINT}") from None
        return _fallback(fallback)
    if region in experts:
        return region, list(experts).index(region)
    if fallback is None:
        raise ValueError(
            f"label {label!r} ({modality}) belongs to region {region!r}, which has no expert in {source} "
            f"(experts: {', '.join(experts)}){_FALLBACK_HINT}"
        )
    return _fallback(fallback)


def _fallback(fallback: str) -> tuple[str, int | None]:
    return ("base", -1) if fallback == "base" else ("teacher", None)

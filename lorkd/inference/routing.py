"""Which network segments each prompt: group a case's labels by region expert.

A LoRKD model runs each label with the expert of its region (region map, modality-aware); a forced
``region`` sends every label to that expert. A label that the map does not know, or whose region has
no expert (SAT's ``whole_body``), is an error unless ``fallback`` names who segments it instead:
``"base"`` (the student's shared weights W0, no expert) or ``"teacher"``. A model without experts
(a SAT teacher, an official SAT file) runs every label itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorkd.label_catalogue import HINT as LABELS_HINT
from lorkd.regions import RegionMap, UnknownLabelError, canonical_modality, mod_label, normalize_label

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
    warn: Callable[[str], None] | None = None,
) -> list[PromptGroup]:
    """Group label indices by the network that segments them, in order of first appearance.

    Without a fallback, every label the map does not know or whose region has no expert is reported in
    one error (each unknown one with its closest known names). With a fallback, ``warn`` is called once per
    label that the map does not know (a typo would otherwise be segmented from its prompt alone).
    """
    check_fallback(fallback)
    if not experts:
        return [PromptGroup("model", None, list(range(len(labels))))]
    if region_map is None:
        raise ValueError(f"{source} has region experts but no region map to route labels with")
    modality = canonical_modality(modality)
    forced = _forced_expert(region, experts, source)
    groups: dict[str, PromptGroup] = {}
    unknown: list[str] = []
    without_expert: list[str] = []
    for i, label in enumerate(labels):
        if forced is not None:
            route, index = experts[forced], forced
        else:
            label = normalize_label(label)
            region_of = region_map.label_region.get(mod_label(modality, label))
            if region_of is None:
                problem = f"label {label!r} for modality {modality!r}{_closest(region_map.closest(modality, label))}"
                if fallback is None:
                    unknown.append(f"unknown {problem}")
                elif warn is not None:
                    warn(f"{problem} is not in the catalogue of {source}: routing.fallback={fallback} segments it "
                         f"from its prompt alone (check the spelling; {LABELS_HINT})")  # fmt: skip
            if region_of in experts:
                route, index = region_of, list(experts).index(region_of)
            elif fallback is not None:
                route, index = _fallback(fallback)
            else:
                if region_of is not None:
                    without_expert.append(f"label {label!r} ({modality}) belongs to region {region_of!r}")
                continue
        groups.setdefault(route, PromptGroup(route, index)).indices.append(i)
    if unknown or without_expert:
        raise _routing_error(unknown, without_expert, experts, source)
    return list(groups.values())


def _closest(names: Sequence[str]) -> str:
    return f" (closest known labels: {', '.join(names)})" if names else " (no known label is close)"


def _routing_error(
    unknown: Sequence[str], without_expert: Sequence[str], experts: Sequence[str], source: str
) -> Exception:
    """One error naming every label that cannot be routed: unknown ones, each with its closest known
    names (an :class:`UnknownLabelError`), and those whose region has no expert (a ValueError)."""
    parts = list(unknown)
    if without_expert:
        verb = "has" if len(without_expert) == 1 else "have"
        parts.append(f"{'; '.join(without_expert)}, which {verb} no expert in {source} (experts: {', '.join(experts)})")
    text = "; ".join(parts) + _FALLBACK_HINT
    return UnknownLabelError(text) if unknown else ValueError(text)


def _forced_expert(region: str | None, experts: Sequence[str], source: str) -> int | None:
    if region is None:
        return None
    name = str(region).strip().lower().replace(" ", "_")
    if name not in experts:
        raise ValueError(f"region {region!r} has no expert in {source}; expected one of {list(experts)}")
    return list(experts).index(name)


def _fallback(fallback: str) -> tuple[str, int | None]:
    return ("base", -1) if fallback == "base" else ("teacher", None)

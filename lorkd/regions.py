"""Label -> region routing for region experts.

Labels are keyed by modality (``ct_liver`` and ``mri_liver`` may live in different regions).
Regions listed in ``regions`` have an expert, in that index order; other regions in ``labels``
(SAT's ``whole_body``) are known but have no expert.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

MODALITY_CODES: dict[str, int] = {"ct": 0, "mri": 1, "us": 2, "pet": 3}
_MRI_HINTS = ("t1", "t2", "mri", "mr", "flair", "dwi", "adc")


class UnknownLabelError(KeyError):
    """A prompt that the region map does not know; the message lists the closest known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show it as a plain sentence
        return str(self.args[0])


class UnknownModalityError(ValueError):
    """A modality string that maps to none of ct / mri / us / pet."""


def canonical_modality(modality: str) -> str:
    """Map a free modality string to ct / mri / us / pet, as SAT's ``_merge_modality`` does.

    MRI hints (t1, t2, flair, ...) win over 'ct' so 'PET/CT' is ct and 'T2' is mri.
    """
    m = str(modality).strip().lower()
    if m in MODALITY_CODES:
        return m
    if any(h in m for h in _MRI_HINTS):
        return "mri"
    if "ct" in m:
        return "ct"
    if "pet" in m:
        return "pet"
    if m in ("ultrasound", "us", "echo"):
        return "us"
    raise UnknownModalityError(f"unknown modality {modality!r}; expected one of {sorted(MODALITY_CODES)} (or MRI sequence names)")


def modality_code(modality: str) -> int:
    return MODALITY_CODES[canonical_modality(modality)]


def normalize_label(label: str) -> str:
    """Prompts are lower-cased, whitespace-collapsed terminology (SAT's convention)."""
    return " ".join(str(label).lower().split())


def normalize_labels(labels: str | Sequence[str]) -> list[str]:
    """A prompt list: one name or several, each normalised; empty names and duplicates are errors."""
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"labels must be a list of names, got {labels!r}")
    out = [normalize_label(x) for x in labels]
    if not out or not all(out):
        raise ValueError(f"labels must be non-empty names, got {list(labels)!r}")
    duplicates = sorted({x for x in out if out.count(x) > 1})
    if duplicates:
        raise ValueError(f"duplicate labels {duplicates}")
    return out


def mod_label(modality: str, label: str) -> str:
    return f"{canonical_modality(modality)}_{normalize_label(label)}"


class RegionMap:
    """Which expert region each (modality, label) prompt belongs to."""

    def __init__(
        self,
        regions: Sequence[str],
        labels: Mapping[str, Iterable[str]],
        abnormal: Iterable[str] = (),
        extra_labels: Mapping[str, str] | None = None,
        extra_abnormal: Iterable[str] = (),
    ) -> None:
        self.regions: list[str] = list(regions)
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"duplicate regions in {self.regions}")
        self.label_region: dict[str, str] = {}
        for region, names in labels.items():
            for name in names:
                self._add(str(name), str(region))
        for name, region in (extra_labels or {}).items():
            self._add(str(name), str(region))
        self.abnormal: set[str] = {self._key(a) for a in (*abnormal, *extra_abnormal)}
        unknown_regions = set(self.label_region.values()) - set(self.regions)
        self.regions_without_expert = sorted(unknown_regions)

    @classmethod
    def from_config(cls, name: str = "sat49") -> RegionMap:
        """The map of ``configs/regions/<name>.yaml`` (its ``defaults`` list resolved as Hydra does,
        without needing a Hydra app, so it also works inside one)."""
        from hydra.utils import instantiate

        return instantiate(_region_config(name))

    @staticmethod
    def _key(name: str) -> str:
        modality, _, label = name.partition("_")
        if not label:
            raise ValueError(f"region map entry {name!r} must be '<modality>_<label>'")
        return mod_label(modality, label)

    def _add(self, name: str, region: str) -> None:
        key = self._key(name)
        previous = self.label_region.get(key)
        if previous is not None and previous != region:
            raise ValueError(f"label {key!r} is mapped to two regions: {previous} and {region}")
        self.label_region[key] = region

    def add(self, label: str, modality: str, region: str) -> None:
        """Put a new (modality, label) prompt in ``region`` (an expert region); the same region again is a no-op."""
        if region not in self.regions:
            raise ValueError(f"cannot add label {label!r} to region {region!r}: expected one of {self.regions}")
        self._add(mod_label(modality, label), region)

    def to_dict(self) -> dict:
        """Plain-data form (stored in checkpoints and exports); ``RegionMap(**d)`` rebuilds it."""
        labels: dict[str, list[str]] = {}
        for key, region in sorted(self.label_region.items()):
            labels.setdefault(region, []).append(key)
        return {"regions": list(self.regions), "labels": labels, "abnormal": sorted(self.abnormal)}

    def __contains__(self, key: str) -> bool:
        return key in self.label_region

    def closest(self, modality: str, label: str, n: int = 5) -> list[str]:
        key = mod_label(modality, label)
        prefix = key.split("_", 1)[0] + "_"
        same_modality = [k for k in self.label_region if k.startswith(prefix)]
        hits = difflib.get_close_matches(key, same_modality, n=n, cutoff=0.5)
        return [h.split("_", 1)[1] for h in hits]

    def region_of(self, label: str, modality: str) -> str:
        """Region name of a prompt (may be a region without an expert, e.g. whole_body)."""
        key = mod_label(modality, label)
        try:
            return self.label_region[key]
        except KeyError:
            close = self.closest(modality, label)
            hint = f"; closest known labels: {', '.join(close)}" if close else ""
            raise UnknownLabelError(
                f"unknown label {normalize_label(label)!r} for modality {canonical_modality(modality)!r}{hint}"
            ) from None

    def expert_of(self, label: str, modality: str) -> int | None:
        """Expert index of a prompt; None when its region has no expert (e.g. whole_body)."""
        region = self.region_of(label, modality)
        return self.regions.index(region) if region in self.regions else None

    def region_index(self, region: str) -> int:
        name = region.strip().lower().replace(" ", "_")
        if name not in self.regions:
            raise KeyError(f"unknown region {region!r}; expected one of {self.regions}")
        return self.regions.index(name)

    def is_abnormal(self, label: str, modality: str) -> bool:
        return mod_label(modality, label) in self.abnormal

    def report_group(self, label: str, modality: str) -> str:
        """Group used in reports: 'abnormal' for lesions (SAT's rule), else the region."""
        if self.is_abnormal(label, modality):
            return "abnormal"
        key = mod_label(modality, label)
        return self.label_region.get(key, "unknown")


def _region_config(name: str):
    """``configs/regions/<name>.yaml`` merged over the files its ``defaults`` name (``_self_`` last unless placed)."""
    from omegaconf import OmegaConf

    from lorkd.utils import CONFIG_DIR

    path = CONFIG_DIR / "regions" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no region map {name!r} in {path.parent} (known: {', '.join(known)})")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    return OmegaConf.merge(*(own if entry == "_self_" else _region_config(str(entry)) for entry in defaults))

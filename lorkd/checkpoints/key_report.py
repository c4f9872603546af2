"""Strict key accounting for checkpoint imports: every key is loaded, or explained, or the load fails."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class CheckpointMismatchError(RuntimeError):
    pass


@dataclass
class KeyReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    explained: dict[str, str] = field(default_factory=dict)  # checkpoint or model key -> why it is fine
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # key -> (ckpt, model)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 8) -> str:
        def show(items: list[str]) -> str:
            more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        lines = [
            f"{self.source}: {len(self.loaded)} loaded, {len(self.explained)} explained, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        if self.missing:
            lines.append(f"  missing: {show(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {show(self.unexpected)}")
        if self.mismatched:
            lines.append(
                "  shape mismatch: "
                + show([f"{k} ckpt{list(a)} vs model{list(b)}" for k, (a, b) in self.mismatched.items()])
            )
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def raise_if_unexplained(self) -> KeyReport:
        if not self.ok:
            raise CheckpointMismatchError(self.summary())
        return self


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (``weights_only=True``) or dict: ``model_state_dict``, else ``state_dict``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    else:
        obj = source
    for key in ("model_state_dict", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{source}: no tensor state_dict found (keys: {list(obj)[:10]})")
    return dict(obj)


def load_mapped(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    report: KeyReport,
    allow_missing: Mapping[str, str] | None = None,
) -> KeyReport:
    """Copy ``tensors`` (already renamed to the model's keys) into ``model``; fill ``report``.

    ``allow_missing`` maps model-key prefixes to the reason they may stay at their initial values.
    Nothing is written unless every key is accounted for.
    """
    target = model.state_dict()
    for key, value in tensors.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched[key] = (tuple(value.shape), tuple(target[key].shape))
        else:
            report.loaded.append(key)
    for key in target:
        if key in tensors:
            continue
        reason = next((why for prefix, why in (allow_missing or {}).items() if key.startswith(prefix)), None)
        if reason is None:
            report.missing.append(key)
        else:
            report.explained[key] = reason
    report.raise_if_unexplained()
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(tensors[key])
    return report

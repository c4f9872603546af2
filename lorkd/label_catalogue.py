"""The label catalogue of a model: what can be asked for (``Predictor.labels()``; the command
``lorkd-labels`` prints it, see :mod:`lorkd.commands.labels`).

For a LoRKD checkpoint or export: every label of its region map per modality, the region and
whether that region has an expert, whether the prompt can be encoded (cached in the prompt bank or a
language model is present), and the parameter counts (one deployed expert; each expert's own
low-rank weights). A model without a region map (a SAT teacher, an official SAT file) lists the
prompts in its bank, valid for every modality.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorkd.regions import MODALITY_CODES, canonical_modality

if TYPE_CHECKING:
    from lorkd.checkpoints.loading import LoadedModel

HINT = "list the labels a model knows with `lorkd-labels ckpt_path=...`"


def expert_parameters(model: LoadedModel) -> dict[str, int]:
    """Each expert's own parameters (its low-rank factors), from the network or the export's cards."""
    from lorkd.checkpoints.loading import ExportedModel

    if isinstance(model, ExportedModel):
        return {r: int(model.exported.card(r).expert.parameters) for r in model.experts}
    from lorkd.experts import expert_parameter_counts

    return dict(expert_parameter_counts(model.net.backbone)) if model.experts else {}


def catalogue(model: LoadedModel, modality: str | None = None) -> dict[str, Any]:
    """Labels per modality with region, expert and prompt availability, plus parameter counts (JSON-ready)."""
    prompts = set(model.prompts.embeddings)
    encodable = model.prompts.language_model is not None
    wanted = [canonical_modality(modality)] if modality is not None else list(MODALITY_CODES)
    own = expert_parameters(model)
    result: dict[str, Any] = {
        "source": model.source,
        "network": model.network,
        "language_model": encodable,
        "parameters": {"deployed": int(model.parameter_count), "experts": own},
        "experts": [{"region": r, "index": i, "parameters": own.get(r)} for i, r in enumerate(model.experts)],
        "labels": {},
    }
    if model.region_map is None:
        rows = [_row(label, None, None, True) for label in sorted(prompts)]
        result["labels"] = {m: rows for m in wanted}
        return result
    for key, region in sorted(model.region_map.label_region.items()):
        mod, label = key.split("_", 1)
        if mod not in wanted:
            continue
        route = region if region in model.experts else None
        if not model.experts:
            route = "model"
        result["labels"].setdefault(mod, []).append(_row(label, region, route, encodable or label in prompts))
    return result


def _row(label: str, region: str | None, route: str | None, prompt: bool) -> dict[str, Any]:
    return {"label": label, "region": region, "expert": route is not None and route != "model", "route": route, "prompt": prompt}


def format_catalogue(entry: dict[str, Any]) -> str:
    """The catalogue as a plain-text table."""
    params = entry["parameters"]
    lines = [f"{entry['source']}: {entry['network']}, {params['deployed']:,} parameters per forward"]
    if entry["experts"]:
        lines.append("experts (own low-rank parameters):")
        lines += [f"  {e['index']:>2} {e['region']:<16} {e['parameters'] or 0:>12,}" for e in entry["experts"]]
    if not entry["language_model"]:
        lines.append("no language model: only labels with prompt 'yes' can be asked for")
    if not entry["labels"]:
        lines.append("no labels for the modality asked for")
    for modality, rows in entry["labels"].items():
        lines.append(f"{modality} ({len(rows)} labels):")
        lines.append(f"  {'label':<36} {'region':<16} {'segmented by':<16} prompt")
        for row in rows:
            served = row["route"] or f"no expert (region {row['region']}): needs fallback=base|teacher"
            prompt = "yes" if row["prompt"] else "no"
            lines.append(f"  {row['label']:<36} {row['region'] or '-':<16} {served:<16} {prompt}")
    return "\n".join(lines)

"""Import official SAT checkpoints (vision model and text encoder) with strict key accounting;
:func:`read_official_sat` is the reader of an official SAT file (a record and its tensors, nothing built).

Vision file: ``{'model_state_dict': {'module.backbone...', ...}}`` with ``all_modules.{0,1}`` aliases of
each conv/norm, ``multihead_attn.in_proj_{weight,bias}`` (q|k|v stacked) and optional deep-supervision
heads. Text file: ``module.text_tower.biolord.*`` (MPNet), ``module.projection_layer.*``,
``module.modality_embed.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints.build import build_network
from lorkd.checkpoints.key_report import CheckpointMismatchError, KeyReport, load_mapped, read_state_dict
from lorkd.checkpoints.read import text_encoder_of
from lorkd.checkpoints.schema import CheckpointMeta, Provenance, SourceRecord, TextHead
from lorkd.models.sat import SAT
from lorkd.models.text import TextEncoder
from lorkd.prompts import LanguageModel

_ALIAS = re.compile(r"^(.*\.convs\.\d+)\.all_modules\.([01])\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(.*\.multihead_attn)\.in_proj_(weight|bias)$")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def sat_vision_to_model_keys(state: Mapping[str, torch.Tensor], report: KeyReport) -> dict[str, torch.Tensor]:
    """Rename SAT's keys to ours; aliases are checked identical and explained, in_proj is split."""
    state = strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        alias = _ALIAS.match(key)
        if alias:
            base, idx, kind = alias.groups()
            twin = f"{base}.{'conv' if idx == '0' else 'norm'}.{kind}"
            if twin in state and torch.equal(state[twin], value):
                report.explained[key] = f"alias of {twin} (SAT registers each conv block twice)"
            else:
                report.unexpected.append(key)
            continue
        in_proj = _IN_PROJ.match(key)
        if in_proj:
            base, kind = in_proj.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}.{name}.{kind}"] = part
            report.explained[key] = f"split into {base}.{{q,k,v}}_proj.{kind}"
            continue
        out[key] = value
    return out


def official_vision_state(model: SAT) -> dict[str, torch.Tensor]:
    """``model``'s state as SAT's DDP-wrapped Maskformer saves it (what ``load_sat_vision`` reads): the
    ``module.`` prefix, ``all_modules`` aliases of each conv unit, q|k|v stacked into ``in_proj``."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    qkv = re.compile(r"^(.*\.multihead_attn)\.(q|k|v)_proj\.(weight|bias)$")
    for key, value in state.items():
        m = qkv.match(key)
        if m:
            base, which, kind = m.groups()
            if which == "q":
                parts = [state[f"{base}.{p}_proj.{kind}"] for p in "qkv"]
                out[f"module.{base}.in_proj_{kind}"] = torch.cat(parts, 0).clone()
            continue
        out[f"module.{key}"] = value.clone()
        unit = re.match(r"^(.*\.convs\.\d+)\.(conv|norm)\.(weight|bias)$", key)
        if unit:
            base, mod, kind = unit.groups()
            out[f"module.{base}.all_modules.{0 if mod == 'conv' else 1}.{kind}"] = out[f"module.{key}"]
    return out


def infer_sat_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture arguments of ``SAT`` read off an official vision state_dict (heads default to 8)."""
    state = strip_prefix(state)
    features, n_convs = [], 0
    s = 0
    while f"backbone.encoder.stages.{s}.0.convs.0.conv.weight" in state:
        features.append(int(state[f"backbone.encoder.stages.{s}.0.convs.0.conv.weight"].shape[0]))
        s += 1
    if not features:
        raise CheckpointMismatchError("not a SAT vision checkpoint: no backbone.encoder.stages.* keys")
    while f"backbone.encoder.stages.0.0.convs.{n_convs}.conv.weight" in state:
        n_convs += 1
    n_dec_convs = 0
    while f"backbone.decoder.stages.0.convs.{n_dec_convs}.conv.weight" in state:
        n_dec_convs += 1
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer_decoder.layers.")})
    ds = [k for k in state if k.startswith("mid_mask_embed_proj.") and k.endswith(".0.weight")]
    strides = [1] + [
        int(state[f"backbone.decoder.transpconvs.{len(features) - 1 - s}.weight"].shape[-1])
        for s in range(1, len(features))
    ]
    return {
        "features": features,
        "strides": strides,
        "n_convs": n_convs,
        "n_convs_decoder": n_dec_convs,
        "in_channels": int(state["backbone.encoder.stages.0.0.convs.0.conv.weight"].shape[1]),
        "query_dim": int(state["projection_layer.2.weight"].shape[0]),
        "proj_hidden": int(state["projection_layer.0.weight"].shape[0]),
        "mask_hidden": int(state["mask_embed_proj.0.weight"].shape[0]),
        "decoder_layers": n_layers,
        "decoder_ffn": int(state["transformer_decoder.layers.0.linear1.weight"].shape[0]),
        "deep_supervision": bool(ds),
        "ds_hidden": [int(state[f"mid_mask_embed_proj.{i}.0.weight"].shape[0]) for i in range(len(ds))] or [256, 384, 512],
    }


def _preset_hint(state: Mapping[str, torch.Tensor], model: SAT) -> str:
    try:
        found = infer_sat_config(state)
    except (CheckpointMismatchError, KeyError):
        return ""
    ours = model.config
    diffs = [
        f"{k}: checkpoint {found[k]} vs model {ours[k]}"
        for k in ("features", "n_convs", "proj_hidden", "mask_hidden", "query_dim", "decoder_layers")
        if found[k] != ours[k]
    ]
    if not diffs:
        return ""
    return "the checkpoint was built with a different backbone preset (" + "; ".join(diffs) + ")"


def load_sat_vision(model: SAT, source: str | Path | Mapping[str, Any], allow_missing_ds: bool = False) -> KeyReport:
    """Load an official SAT-Nano/SAT-Pro vision checkpoint into ``model``; raise unless every key is explained."""
    raw = read_state_dict(source)
    report = KeyReport(source=str(source) if isinstance(source, (str, Path)) else "state_dict")
    tensors = sat_vision_to_model_keys(raw, report)
    if not model.deep_supervision:
        for key in [k for k in tensors if k.startswith("mid_mask_embed_proj.")]:
            report.explained[key] = "deep-supervision head (training only; model built without deep supervision)"
            del tensors[key]
    report.hint = _preset_hint(raw, model)
    allow = {"mid_mask_embed_proj.": "deep-supervision head absent from the checkpoint; starts from its initialisation"}
    return load_mapped(model, tensors, report, allow if allow_missing_ds else None)


def sat_model_from_checkpoint(source: str | Path | Mapping[str, Any], **net_overrides: Any) -> tuple[SAT, KeyReport]:
    """Build a ``SAT`` whose architecture is read off an official checkpoint, then load it strictly."""
    state = read_state_dict(source)
    model = build_network({**infer_sat_config(state), **net_overrides})
    return model, load_sat_vision(model, state)


def read_sat_text(
    source: str | Path | Mapping[str, Any], language_model_path: str, max_length: int = 64
) -> tuple[TextHead, dict[str, torch.Tensor], dict[str, str]]:
    """An official SAT text-encoder file read, nothing built: its text head record (with
    ``language_model_path``), its tensors (the head's under ``text_encoder.``, the language model's
    ``text_tower.biolord.*`` under ``language_model.``) and the keys explained without loading them."""
    state = strip_prefix(read_state_dict(source))
    name = str(source) if isinstance(source, (str, Path)) else "state_dict"
    lm_weights, head, explained = {}, {}, {}
    for key, value in state.items():
        if key.startswith("text_tower.biolord."):
            lm_weights[key[len("text_tower.biolord.") :]] = value
        elif "atlas_tower" in key or "temperature" in key:
            explained[key] = "knowledge-pretraining leftover (SAT drops it too)"
        else:
            head[key] = value
    if not lm_weights:
        raise CheckpointMismatchError(f"{name}: no text_tower.biolord.* keys; is this a SAT text encoder?")
    proj = head.get("projection_layer.0.weight")
    out = head.get("projection_layer.2.weight")
    if proj is None or out is None:
        raise CheckpointMismatchError(f"{name}: no projection_layer weights")
    record = TextHead(
        hidden_dim=int(proj.shape[1]), query_dim=int(out.shape[0]), proj_hidden=int(proj.shape[0]),
        language_model_path=language_model_path, max_length=max_length,
    )  # fmt: skip
    explained["text_tower.biolord.*"] = f"{len(lm_weights)} language-model tensors (loaded on first use)"
    tensors = {f"text_encoder.{k}": v for k, v in head.items()} | {f"language_model.{k}": v for k, v in lm_weights.items()}
    return record, tensors, explained


def load_sat_text_encoder(
    source: str | Path | Mapping[str, Any], language_model_path: str, max_length: int = 64
) -> tuple[TextEncoder, KeyReport]:
    """Official SAT text-encoder file -> ``TextEncoder`` (head loaded) with its ``LanguageModel``.

    ``language_model_path`` is a local folder with the language model's config and tokenizer (e.g.
    BioLORD-2023-C); its weights come from the checkpoint's ``text_tower.biolord.*`` tensors.
    """
    head, tensors, explained = read_sat_text(source, language_model_path, max_length)
    report = KeyReport(source=str(source) if isinstance(source, (str, Path)) else "state_dict", explained=explained)
    return text_encoder_of(head, tensors, report), report


def read_official_sat(
    raw: Mapping[str, Any],
    provenance: Provenance,
    text_checkpoint: str | Path | None,
    language_model_path: str | None,
    net_overrides: Mapping[str, Any] | None = None,
) -> SourceRecord:
    """The reader of an official SAT vision file (``raw``, already loaded) and its paired text encoder:
    architecture read off the keys (``net_overrides``: what they do not record), keys renamed; nothing built.
    Without ``text_checkpoint`` the record has no text side (the caller gives a built text encoder)."""
    state = read_state_dict(raw)
    net = {**infer_sat_config(state), **dict(net_overrides or {})}
    report = KeyReport(source=provenance.source)
    tensors = sat_vision_to_model_keys(state, report)
    if not net.get("deep_supervision", True):
        for key in [k for k in tensors if k.startswith("mid_mask_embed_proj.")]:
            report.explained[key] = "deep-supervision head (training only; model built without deep supervision)"
            del tensors[key]
    record = {f"net.{k}": v for k, v in tensors.items()}
    head = TextHead(hidden_dim=0, query_dim=int(net["query_dim"]), proj_hidden=0)
    if text_checkpoint:
        if not language_model_path:
            raise ValueError("an official SAT text-encoder checkpoint needs language_model_path (config + tokenizer)")
        head, text, explained = read_sat_text(text_checkpoint, language_model_path)
        if head.query_dim != net["query_dim"]:
            raise CheckpointMismatchError(f"{text_checkpoint}: query dim {head.query_dim}, configured {net['query_dim']}")
        record.update(text)
        report.explained.update({f"{text_checkpoint}: {k}": why for k, why in explained.items()})
    meta = CheckpointMeta(kind="sat", text_encoder=head, prompt_bank={}, net=net)
    return SourceRecord(meta, provenance, record, explained=report.explained)


def build_text_encoder(
    language_model_path: str | None = None,
    checkpoint: str | None = None,
    query_dim: int = 768,
    proj_hidden: int = 768,
    max_length: int = 64,
) -> TextEncoder:
    """A fresh text encoder on a local language model, or SAT's paired text encoder from ``checkpoint``."""
    if checkpoint:
        if not language_model_path:
            raise ValueError("an official SAT text-encoder checkpoint needs language_model_path (config + tokenizer)")
        encoder, report = load_sat_text_encoder(checkpoint, language_model_path, max_length)
        if encoder.query_dim != query_dim:
            raise CheckpointMismatchError(f"{checkpoint}: query dim {encoder.query_dim}, configured {query_dim}")
        return encoder
    lm = LanguageModel(language_model_path, max_length=max_length)
    return TextEncoder(lm, query_dim=query_dim, proj_hidden=proj_hidden)

"""Load a SAT teacher from an official SAT checkpoint or from a SATModule (Lightning) checkpoint."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.build import build_network
from lorkd.checkpoints.report import KeyReport, load_mapped
from lorkd.checkpoints.sat import sat_model_from_checkpoint
from lorkd.checkpoints.schema import TextHead
from lorkd.models.sat import SAT
from lorkd.models.text import LanguageModel, TextEncoder, file_fingerprint


@dataclass
class Teacher:
    net: SAT
    text_encoder: TextEncoder | None  # None for official vision files (the text encoder is a separate file)
    prompt_bank: dict[str, Any] | None
    region_map: dict[str, Any] | None
    source: str
    fingerprint: str
    report: KeyReport


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` onto the CPU with ``weights_only=True`` (explicit: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    cannot turn it off); a file holding other pickled objects is refused with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path}: refused, the checkpoint holds pickled objects other than tensors and plain data{what}; "
            "unpickling them could run code, so checkpoints are only loaded with weights_only=True"
        ) from None


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_text_encoder_from_meta(head: TextHead, state: Mapping[str, torch.Tensor], source: str) -> TextEncoder:
    """The text head stored in one of our checkpoints; its language model only if the folder still exists."""
    lm_path = head.language_model_path
    lm = LanguageModel(lm_path, max_length=head.max_length) if lm_path and Path(lm_path).is_dir() else None
    encoder = TextEncoder(lm, hidden_dim=head.hidden_dim, query_dim=head.query_dim, proj_hidden=head.proj_hidden)
    load_mapped(encoder, state, KeyReport(source=f"{source} (text encoder)"))
    return encoder


def load_teacher(path: str | Path | None, net_overrides: Mapping[str, Any] | None = None) -> Teacher:
    """Official SAT vision file (architecture read off its keys, ``net_overrides`` e.g. ``decoder_heads``)
    or a SATModule checkpoint (architecture, text head and prompt bank stored inside)."""
    if path is None:
        raise ValueError("no teacher checkpoint: a LoRKD model is distilled from a SAT teacher (teacher.checkpoint=PATH)")
    overrides = dict(net_overrides or {})
    raw = read_checkpoint(path)
    fingerprint = file_fingerprint([Path(path)])
    meta = schema.read(raw, str(path))
    if meta is None:
        net, report = sat_model_from_checkpoint(raw, **overrides)
        return Teacher(net, None, None, None, str(path), fingerprint, report)
    if meta.kind != "sat":
        raise ValueError(f"{path} is a {meta.kind!r} checkpoint; a teacher must be a SAT model")
    state = raw["state_dict"]
    report = KeyReport(source=str(path))
    net = build_network({**meta.net, **overrides}, state=sub_state(state, "net."), report=report)
    text = build_text_encoder_from_meta(meta.text_encoder, sub_state(state, "text_encoder."), str(path))
    return Teacher(net, text, meta.prompt_bank, meta.region_map, str(path), fingerprint, report)


def read_student_state(path: str | Path | None) -> dict[str, torch.Tensor] | None:
    """The student (base and experts) of our LoRKD checkpoint at ``path``, to start a training from
    (``model.student_state.path``); None without a path."""
    if path is None:
        return None
    raw = read_checkpoint(path)
    meta = schema.read(raw, str(path))
    if meta is None or meta.kind != "lorkd":
        raise ValueError(f"{path} is not a LoRKD checkpoint of this project (convert a released file first)")
    return sub_state(raw["state_dict"], "student.")

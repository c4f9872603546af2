"""Read checkpoint files safely (``weights_only=True``), take sub-states, rebuild a stored text head."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints.key_report import KeyReport, load_mapped
from lorkd.checkpoints.schema import TextHead
from lorkd.io import read_stable
from lorkd.models.text import TextEncoder
from lorkd.prompts import LanguageModel


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` onto the CPU with ``weights_only=True`` (explicit: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    cannot turn it off); a file holding other pickled objects is refused with a one-line error."""
    return read_checkpoint_identity(path)[0]


def read_checkpoint_identity(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`read_checkpoint` and the :func:`~lorkd.io.file_identity` of the very bytes it loaded
    (:func:`~lorkd.io.read_stable`: a ``last.ckpt`` rewritten meanwhile is not taken for the one read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return read_stable(path, lambda f: torch.load(f, map_location="cpu", weights_only=True))
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
    tensors = {f"text_encoder.{k}": v for k, v in state.items()}
    return text_encoder_of(head, tensors, KeyReport(source=f"{source} (text encoder)"))


def text_encoder_of(head: TextHead, tensors: Mapping[str, torch.Tensor], report: KeyReport) -> TextEncoder:
    """The text encoder a record describes: ``head`` with the ``text_encoder.`` tensors loaded (strict key
    accounting into ``report``) and its language model: with ``language_model.`` weights (an official text
    encoder), on ``head``'s folder, which must exist; without, only if the folder still exists."""
    lm_path, weights = head.language_model_path, sub_state(tensors, "language_model.")
    lm = None
    if weights:
        lm = LanguageModel(lm_path, max_length=head.max_length, weights=weights)
    elif lm_path and Path(lm_path).is_dir():
        lm = LanguageModel(lm_path, max_length=head.max_length)
    encoder = TextEncoder(lm, hidden_dim=head.hidden_dim, query_dim=head.query_dim, proj_hidden=head.proj_hidden)
    load_mapped(encoder, sub_state(tensors, "text_encoder."), report)
    return encoder

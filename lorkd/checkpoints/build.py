"""How a network is built: a network spec (``SAT`` arguments) and, for a LoRKD student, its experts spec.

:func:`build` turns the record of any source (:class:`~lorkd.checkpoints.schema.SourceRecord`, from the
readers of :mod:`lorkd.checkpoints.loading`) into its network and prompt bank, once. Training
(:class:`~lorkd.modules.lorkd_module.LoRKDModule`), export and the adapters reader build through
:func:`build_network` (or :func:`add_experts` on a network they already hold); :func:`backbone_presets`
names the ``configs/backbone`` preset an architecture is.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
import yaml

from lorkd.checkpoints.key_report import KeyReport, load_mapped
from lorkd.checkpoints.read import sub_state, text_encoder_of
from lorkd.checkpoints.schema import ExpertsSpec, SourceRecord
from lorkd.models.sat import SAT
from lorkd.models.text import TextEncoder
from lorkd.prompts import PromptBank
from lorkd.utils import CONFIG_DIR

# what tells backbone presets apart (the heads' widths included; decoder sizes are set per model config)
PRESET_KEYS = ("features", "strides", "n_convs", "proj_hidden", "mask_hidden", "latent_stride")


def add_experts(net: SAT, experts: ExpertsSpec, plain_experts: bool = False) -> SAT:
    """Put ``experts``' region experts on ``net``'s backbone, in place; returns ``net``: as peft adapters
    (training, export), or with ``plain_experts`` as the peft-free layers of :mod:`lorkd.experts.plain`
    (inference: the same keys and outputs, without importing peft)."""
    if not plain_experts:
        from lorkd.experts import add_region_experts  # peft: plain networks (exports) build without it

        net.backbone = add_region_experts(net.backbone, **experts.arguments())
    else:
        from lorkd.experts.plain import add_plain_experts

        net.backbone = add_plain_experts(net.backbone, **experts.arguments())
    return net


def build_network(
    net: Mapping[str, Any],
    experts: ExpertsSpec | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    report: KeyReport | str = "state",
    plain_experts: bool = False,
) -> SAT:
    """``SAT(**net)`` with ``experts`` on its backbone (None: a plain SAT; ``plain_experts``: see :func:`add_experts`);
    with ``state`` (the network's own keys), every tensor loaded with strict key accounting into ``report``
    (a :class:`KeyReport` or its source)."""
    model = SAT(**net)
    if experts is not None:
        add_experts(model, experts, plain_experts)
    if state is not None:
        load_mapped(model, state, report if isinstance(report, KeyReport) else KeyReport(source=report))
    return model


def build(record: SourceRecord, plain_experts: bool = False, text_encoder: TextEncoder | None = None) -> tuple[SAT, PromptBank]:
    """The network (in eval mode) and prompt bank of any source's record; every tensor loaded with strict key
    accounting (the keys the reader explained are listed as such). ``plain_experts``: see :func:`add_experts`;
    ``text_encoder``: a built one to use instead of the record's (an official SAT file read without one)."""
    meta, tensors = record.meta, record.tensors
    report = KeyReport(source=record.provenance.source, explained=dict(record.explained))
    if meta.kind == "lorkd":
        net = build_network(meta.net, meta.experts, sub_state(tensors, "student."), report, plain_experts=plain_experts)
    else:
        net = build_network(meta.net, state=sub_state(tensors, "net."), report=report)
    return net.eval(), build_prompts(record, text_encoder)


def build_prompts(record: SourceRecord, text_encoder: TextEncoder | None = None) -> PromptBank:
    """The prompt bank of a record (its text head, or ``text_encoder``), filled with ``record.encode``."""
    meta = record.meta
    if text_encoder is None:
        report = KeyReport(source=f"{record.provenance.source} (text encoder)")
        text_encoder = text_encoder_of(meta.text_encoder, record.tensors, report)
    bank = PromptBank(text_encoder)
    if meta.prompt_bank:
        bank.load_state_dict(meta.prompt_bank)
    if record.encode:  # every prompt into the bank, then the language model is let go (a converted checkpoint's bank)
        bank.ensure(record.encode)
        state = bank.state_dict()
        text_encoder.language_model = None
        bank = PromptBank(text_encoder)
        bank.load_state_dict(state)
    return bank


@cache
def preset_spec(name: str) -> dict[str, Any]:
    """The arguments of ``configs/backbone/<name>.yaml``."""
    path = CONFIG_DIR / "backbone" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no backbone preset {name!r} ({path} does not exist)")
    return yaml.safe_load(path.read_text())


def preset_differences(config: Mapping[str, Any], name: str) -> list[str]:
    """``"key: checkpoint X vs <name> Y"`` for every :data:`PRESET_KEYS` entry where ``config`` and the preset differ."""
    spec = preset_spec(name)
    return [f"{k}: checkpoint {config.get(k)} vs {name} {spec.get(k)}" for k in PRESET_KEYS if spec.get(k) != config.get(k)]


def backbone_presets(config: Mapping[str, Any]) -> list[str]:
    """Names of the ``configs/backbone`` presets whose architecture ``config`` (``SAT`` arguments) has."""
    names = sorted(path.stem for path in (CONFIG_DIR / "backbone").glob("*.yaml"))
    return [name for name in names if not preset_differences(config, name)]

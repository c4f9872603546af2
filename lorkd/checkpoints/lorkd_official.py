"""Official LoRKD checkpoints (``lorkd-imbalance-{nano,pro}.pth``) -> our ``experts.style=lorkd`` student.

Layout (``model_state_dict``, 830 / 994 keys; reference/lorkd.md §9):

* ``model.module.backbone.{encoder.stages.{s}.0, decoder.stages.{s}}.stages.{i}.conv.conv.{weight,bias}``: W0, b
* ``….conv.lora_A_list.{t}`` (3·r_t, 9·Cin) and ``….conv.lora_B_list.{t}`` (3·Cout, 3·r_t): expert t,
  ΔW_t = 2·(B_t @ A_t).view(Cout, Cin, 3, 3, 3); decoder ranks are twice the encoder's
* ``….stages.{i}.norm.*``, ``model.module.backbone.decoder.transpconvs.{s}.*``
* ``unet.*``: the same backbone tensors again (the official adapter wrapper registers the backbone twice);
  checked identical and explained, never loaded twice
* ``model.module.{projection_layer, transformer_decoder, mask_embed_proj}.*`` with
  ``multihead_attn.in_proj_{weight,bias}`` (q|k|v stacked; split into our q/k/v projections)

Expert index order: abdomen, brain, head_and_neck, lower_limb, pelvis, spine, thorax, upper_limb.

Ways in: :func:`read_lorkd_official` is the reader ``load_model`` uses (the record of one of our LoRKD
checkpoints and its tensors, nothing built; ``lorkd.checkpoints.build.build`` builds it once, with a
prompt bank for every region-map label); :func:`load_lorkd_official` builds the student alone in memory
(routing with ``lorkd.experts.route``); :func:`convert_lorkd_official` writes one of our LoRKD checkpoints,
which ``predict.py``/``eval.py``, ``lorkd-export`` and fine-tuning then read like a trained one.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.build import backbone_presets, build, build_network, preset_differences
from lorkd.checkpoints.key_report import CheckpointMismatchError, KeyReport, read_state_dict
from lorkd.checkpoints.sat_official import (
    infer_sat_config,
    load_sat_text_encoder,
    read_sat_text,
    sat_vision_to_model_keys,
)
from lorkd.checkpoints.schema import (
    CheckpointMeta,
    ExpertsSpec,
    Provenance,
    SourceRecord,
    TeacherSource,
    TextHead,
)
from lorkd.io import atomic_write, file_fingerprint
from lorkd.models.sat import SAT
from lorkd.models.text import TextEncoder
from lorkd.prompts import PromptBank
from lorkd.regions import RegionMap

OFFICIAL_REGIONS = ("abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb")
OFFICIAL_SCALING = 2.0
STUDENT_PRESETS = {"nano": "unet_student_nano", "pro": "unet_nano"}  # official file -> student backbone config
_MODEL_PREFIX = "model."  # the wrapper's ``model`` (a DDP-wrapped Maskformer: ``model.module.*``)
_ALIAS_PREFIX = "unet."
_UNIT = re.compile(r"^(backbone\.(?:encoder\.stages\.\d+\.0|decoder\.stages\.\d+))\.stages\.(\d+)\.(conv|norm)\.(.+)$")
_LORA = re.compile(r"^lora_([AB])_list\.(\d+)$")
_PEFT = "backbone.base_model.model."


@dataclass
class OfficialLoRKD:
    """An official LoRKD student loaded into our model: ``net.backbone`` is a peft model with 8 lorkd-style experts."""

    net: SAT
    experts: ExpertsSpec
    preset: str | None  # "nano" | "pro" | None (another architecture)
    text_encoder: TextEncoder | None
    report: KeyReport
    source: str


def is_lorkd_official(state: Mapping[str, Any]) -> bool:
    return any(".lora_A_list." in k for k in state)


def _split(state: Mapping[str, torch.Tensor], report: KeyReport) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Official keys -> plain SAT keys (W0 as ``….convs.{i}.conv.weight``) + LoRA tensors per conv unit."""
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_ALIAS_PREFIX):
            twin = f"{_MODEL_PREFIX}module.backbone.{key[len(_ALIAS_PREFIX):]}"
            if twin in state and torch.equal(state[twin], value):
                report.explained[key] = f"alias of {twin} (the official adapter wrapper registers the backbone as `unet` too)"
            else:
                report.unexpected.append(f"{key} (differs from {twin} or has no twin)")
            continue
        if not key.startswith(_MODEL_PREFIX):
            report.unexpected.append(key)
            continue
        inner = key[len(_MODEL_PREFIX) :]
        unit = _UNIT.match(inner.removeprefix("module."))
        if unit is None:
            plain[inner] = value
            continue
        stage, i, part, rest = unit.groups()
        name = f"{stage}.convs.{i}.{part}"
        lora_key = _LORA.match(rest) if part == "conv" else None
        if lora_key:
            which, t = lora_key.groups()
            lora.setdefault(name, {})[(which, int(t))] = value
        elif part == "conv" and rest.startswith("conv."):
            plain[f"module.{name}.{rest[len('conv.'):]}"] = value
        else:
            plain[f"module.{name}.{rest}"] = value
    return sat_vision_to_model_keys(plain, report), lora


def _expert_ranks(lora: Mapping[str, Mapping[tuple[str, int], torch.Tensor]], regions: Sequence[str], source: str) -> tuple[dict[str, int], int]:
    """Encoder rank per expert and the decoder rank factor, read off the A tensors (A is (3·r, 9·Cin))."""
    found = sorted({t for tensors in lora.values() for (_, t) in tensors})
    if found != list(range(len(regions))):
        raise CheckpointMismatchError(f"{source}: experts {found} in the checkpoint, expected 0..{len(regions) - 1} for {list(regions)}")
    seen: dict[str, dict[int, set[int]]] = {"encoder": {}, "decoder": {}}
    for name, tensors in lora.items():
        side = "encoder" if name.startswith("backbone.encoder.") else "decoder"
        for (which, t), value in tensors.items():
            if which == "A":
                seen[side].setdefault(t, set()).add(int(value.shape[0]) // 3)
    ranks: dict[str, dict[int, int]] = {}
    for side, table in seen.items():
        bad = {regions[t]: sorted(r) for t, r in table.items() if len(r) != 1}
        if bad or len(table) != len(regions):
            raise CheckpointMismatchError(f"{source}: {side} ranks are not one per expert ({bad or sorted(table)})")
        ranks[side] = {t: min(r) for t, r in table.items()}
    factors = {ranks["decoder"][t] / r for t, r in ranks["encoder"].items()}
    if len(factors) != 1 or not next(iter(factors)).is_integer():
        raise CheckpointMismatchError(f"{source}: decoder ranks are not one integer multiple of the encoder ranks")
    return {regions[t]: r for t, r in sorted(ranks["encoder"].items())}, int(factors.pop())


def _match_preset(config: Mapping[str, Any], wanted: str | None, source: str) -> str | None:
    """The official student preset this architecture is; with ``wanted``, raise unless it is that one."""
    if wanted is not None and wanted not in STUDENT_PRESETS:
        raise ValueError(f"student_preset must be one of {sorted(STUDENT_PRESETS)} or None, got {wanted!r}")
    found = [p for p, backbone in STUDENT_PRESETS.items() if backbone in backbone_presets(config)]
    if wanted is not None and wanted not in found:
        diffs = "; ".join(preset_differences(config, STUDENT_PRESETS[wanted]))
        raise CheckpointMismatchError(f"{source}: not a LoRKD-{wanted} student ({diffs})")
    return found[0] if found else None


def _student_state(plain: Mapping[str, torch.Tensor], lora: Mapping[str, Mapping], regions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Plain SAT keys + LoRA tensors -> the keys of ``SAT`` whose backbone carries peft experts."""
    out: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if not key.startswith("backbone."):
            out[key] = value
            continue
        unit, _, kind = key.rpartition(".")
        inner = unit[len("backbone.") :]
        out[f"{_PEFT}{inner}.base_layer.{kind}" if unit in lora else f"{_PEFT}{key[len('backbone.'):]}"] = value
    for unit, tensors in lora.items():
        for (which, t), value in tensors.items():
            out[f"{_PEFT}{unit[len('backbone.'):]}.lora_{which}.{regions[t]}.weight"] = value
    return out


def _read_student(
    state: Mapping[str, torch.Tensor], source: str, student_preset: str | None, regions: Sequence[str], net_overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], ExpertsSpec, str | None, dict[str, torch.Tensor], KeyReport]:
    """An official student's architecture, experts spec, preset, tensors in our keys and the keys explained."""
    if not is_lorkd_official(state):
        raise CheckpointMismatchError(f"{source}: no lora_A_list keys; not an official LoRKD checkpoint")
    report = KeyReport(source=source)
    plain, lora = _split(state, report)
    report.raise_if_unexplained()
    ranks, factor = _expert_ranks(lora, regions, source)
    experts = ExpertsSpec(list(regions), ranks, factor, OFFICIAL_SCALING, style="lorkd", train_base=True)
    net = {**infer_sat_config(plain), **net_overrides}
    defaults = {k: p.default for k, p in inspect.signature(SAT).parameters.items() if p.default is not p.empty}
    preset = _match_preset({**defaults, **net}, student_preset, source)
    return net, experts, preset, _student_state(plain, lora, regions), report


def load_lorkd_official(
    path: str | Path,
    student_preset: str | None = None,
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    regions: Sequence[str] = OFFICIAL_REGIONS,
    **net_overrides: Any,
) -> OfficialLoRKD:
    """Load an official LoRKD student with strict key accounting (every key loaded or explained).

    ``student_preset`` ("nano" | "pro") is checked against the architecture read off the keys (None: any);
    ``net_overrides`` sets what the keys do not record (``decoder_heads``, ``dropout``, ``latent_stride``).
    With ``text_checkpoint`` (the paired ``{nano,pro}_text_encoder.pth``) and ``language_model_path`` (a
    local BioLORD-2023-C folder with config and tokenizer) the text encoder is loaded too.
    """
    source = str(path)
    net_config, experts, preset, state, report = _read_student(read_state_dict(path), source, student_preset, regions, net_overrides)
    net = build_network(net_config, experts, state, report)
    text = None
    if text_checkpoint is not None:
        if not language_model_path:
            raise ValueError("text_checkpoint needs language_model_path (a local BioLORD-2023-C folder: config + tokenizer)")
        text, _ = load_sat_text_encoder(text_checkpoint, language_model_path)
        if text.query_dim != net.query_dim:
            raise CheckpointMismatchError(f"{text_checkpoint}: query dim {text.query_dim}, the student's is {net.query_dim}")
    return OfficialLoRKD(net.eval(), experts, preset, text, report, source)


def _teacher_meta(teacher_checkpoint: str | Path) -> tuple[TeacherSource, int]:
    """What our checkpoints record about the teacher, and its parameter count (built on the meta device)."""
    config = infer_sat_config(read_state_dict(teacher_checkpoint))
    with torch.device("meta"):
        count = sum(p.numel() for p in build_network(config).parameters())
    path = Path(teacher_checkpoint)
    return TeacherSource(path=str(path.resolve()), fingerprint=file_fingerprint([path]), net=config), count


def _parameter_counts(state: Mapping[str, torch.Tensor], regions: Sequence[str]) -> dict[str, int]:
    """The student's parameter counts read off its tensors (as ``base_parameter_count`` and
    ``expert_parameter_counts`` count them on the built network)."""
    base = sum(v.numel() for k, v in state.items() if ".lora_" not in k)
    experts = {r: sum(v.numel() for k, v in state.items() if f".lora_A.{r}." in k or f".lora_B.{r}." in k) for r in regions}
    counts = {"student_base": base, "experts_all": sum(experts.values()), "deployed_expert": base}
    return counts | {f"expert_{k}": v for k, v in experts.items()}


def read_lorkd_official(
    state: Mapping[str, torch.Tensor],
    provenance: Provenance,
    text_checkpoint: str | Path,
    language_model_path: str,
    student_preset: str | None = None,
    region_map: RegionMap | None = None,
    labels: Sequence[str] | None = None,
    teacher_checkpoint: str | Path | None = None,
    net_overrides: Mapping[str, Any] | None = None,
) -> SourceRecord:
    """The reader of an official LoRKD file (its ``model_state_dict``, already loaded) and its paired text
    encoder: the record of one of our LoRKD checkpoints and its tensors, nothing built.

    The build encodes ``labels`` (default: every label of the region map) into the prompt bank with the
    paired language model, so the network needs no language model afterwards; ``teacher_checkpoint`` (the
    SAT vision file distilled from) is recorded for ``network="teacher"`` and parameter ratios;
    ``net_overrides`` as in :func:`load_lorkd_official` (the official files use SAT's defaults).
    """
    source = provenance.source
    net, experts, preset, student, report = _read_student(state, source, student_preset, OFFICIAL_REGIONS, dict(net_overrides or {}))
    region_map = region_map or RegionMap.from_config("sat49")  # the official experts' routing
    if tuple(region_map.regions) != OFFICIAL_REGIONS:
        raise ValueError(f"the official experts are in order {list(OFFICIAL_REGIONS)}; region map has {region_map.regions}")
    head, text, explained = read_sat_text(text_checkpoint, language_model_path)
    if head.query_dim != int(net["query_dim"]):
        raise CheckpointMismatchError(f"{text_checkpoint}: query dim {head.query_dim}, the student's is {net['query_dim']}")
    counts = _parameter_counts(student, OFFICIAL_REGIONS)
    teacher = None
    if teacher_checkpoint is not None:
        teacher, counts["teacher"] = _teacher_meta(teacher_checkpoint)
    meta = CheckpointMeta(
        kind="lorkd",
        net=net,
        experts=experts,
        text_encoder=head,
        prompt_bank={},
        region_map=region_map.to_dict(),
        data={"preprocess": dict(schema.SAT_PREPROCESS), "patch_size": list(schema.SAT_PATCH_SIZE)},
        teacher=teacher,
        parameter_counts=counts,
        converted_from={
            "path": str(Path(source).resolve()), "fingerprint": file_fingerprint([Path(source)]),
            "preset": preset, "text_checkpoint": str(Path(text_checkpoint).resolve()),
        },
    )  # fmt: skip
    tensors = {f"student.{k}": v for k, v in student.items()} | text
    encode = list(labels) if labels is not None else sorted({k.split("_", 1)[1] for k in region_map.label_region})
    return SourceRecord(meta, provenance, tensors, explained={**report.explained, **explained}, encode=encode)


def lorkd_checkpoint_from_official(
    path: str | Path,
    text_checkpoint: str | Path,
    language_model_path: str,
    student_preset: str | None = None,
    region_map: RegionMap | None = None,
    labels: Sequence[str] | None = None,
    teacher_checkpoint: str | Path | None = None,
    net_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An official checkpoint as one of our LoRKD checkpoints (``state_dict`` + :mod:`~lorkd.checkpoints.schema` record), in memory:
    :func:`read_lorkd_official`, built once (the prompt bank filled for ``labels``)."""
    record = read_lorkd_official(
        read_state_dict(path), Provenance(str(path), "official-lorkd"), text_checkpoint, language_model_path,
        student_preset, region_map, labels, teacher_checkpoint, net_overrides,
    )  # fmt: skip
    net, bank = build(record)
    return checkpoint_of(record, net, bank)


def converted_meta(record: SourceRecord, net: SAT, bank: PromptBank) -> CheckpointMeta:
    """The record of a built official file as our LoRKD checkpoint records it: the network's full
    arguments, the bank holding every prompt, no language model (the official tower is not a plain folder)."""
    return replace(
        record.meta, net=dict(net.config), prompt_bank=bank.state_dict(),
        text_encoder=replace(TextHead.of(bank.text_encoder), language_model_path=None),
    )  # fmt: skip


def checkpoint_of(record: SourceRecord, net: SAT, bank: PromptBank) -> dict[str, Any]:
    """A built official file as one of our LoRKD checkpoints: its network's and text head's tensors and
    :func:`converted_meta`."""
    meta = converted_meta(record, net, bank)
    state = {f"student.{k}": v for k, v in net.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in bank.text_encoder.state_dict().items()})
    return schema.write({"state_dict": state}, meta)


def convert_lorkd_official(path: str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Write :func:`lorkd_checkpoint_from_official` to ``out`` (atomically); returns ``out``."""
    out = Path(out)
    checkpoint = lorkd_checkpoint_from_official(path, **kwargs)
    return atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))

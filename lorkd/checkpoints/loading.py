"""The one loader: what a file is and how its network is built, for prediction, evaluation, export and training.

:func:`read_source` reads a checkpoint file with the reader of its kind into a
:class:`~lorkd.checkpoints.schema.SourceRecord` (record + tensors, nothing built);
:func:`lorkd.checkpoints.build.build` builds any record once. :func:`load_model` does both for every
supported source and returns a :class:`LoadedModel`:

* a LoRKD checkpoint (``kind: lorkd``): the student with its region experts (``network="experts"``) or its
  teacher (``network="teacher"``, read from the path recorded in the checkpoint, fingerprint checked);
* a SATModule checkpoint (``kind: sat``): the teacher alone;
* an official SAT vision file + its paired text encoder (files: ``text_checkpoint`` and
  ``language_model_path``; or a built ``text_encoder``);
* an official LoRKD file (``lorkd-imbalance-{nano,pro}.pth``), read as one of our LoRKD checkpoints
  (:func:`~lorkd.checkpoints.lorkd_official.read_lorkd_official`; needs its paired text encoder files) and
  built once;
* an export directory (``lorkd-export``): one merged standalone model per region, no peft involved
  (with ``runtime="onnx"``: its ONNX experts in onnxruntime).

Training reads its teacher with :func:`load_teacher` and a student to start from with
:func:`read_student_state` (Hydra ``_target_``s of ``configs/model/lorkd_*.yaml``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.build import build, build_network, build_prompts
from lorkd.checkpoints.exported import ExportedExperts, load_export
from lorkd.checkpoints.lorkd_official import converted_meta, is_lorkd_official, read_lorkd_official
from lorkd.checkpoints.read import read_checkpoint_identity, sub_state
from lorkd.checkpoints.sat_official import read_official_sat
from lorkd.checkpoints.schema import CheckpointMeta, Provenance, SourceRecord
from lorkd.io import file_fingerprint, file_identity
from lorkd.models.sat import SAT
from lorkd.models.text import TextEncoder
from lorkd.prompts import PromptBank
from lorkd.regions import RegionMap

RUNTIMES = ("torch", "onnx")


@dataclass
class LoadedModel:
    net: SAT  # with region experts on its backbone when ``experts`` is non-empty
    prompts: PromptBank
    network: str  # which network of the checkpoint: "experts" | "teacher"
    experts: list[str] = field(default_factory=list)  # expert names in index order
    region_map: RegionMap | None = None
    data: dict[str, Any] = field(default_factory=dict)  # preprocessing and patch size used in training
    source: str = ""  # the file whose weights these are (a LoRKD checkpoint's teacher: the teacher's file)
    fingerprint: str = ""  # sha256 prefix of ``source`` where it was hashed on loading
    loaded_from: str = ""  # the checkpoint given to the loader, when it is not ``source`` itself
    meta: CheckpointMeta | None = None  # the record of the checkpoint ``net`` was built from (None: official SAT, export)
    # what predict and eval key their resume on: the file_identity of the checkpoint bytes loaded (given to
    # the loader, also for its teacher), or an export's folder and the sha256 of the index.json it read
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        """Parameters used for one forward (a deployed expert: the base's size; experts excluded)."""
        return sum(p.numel() for n, p in self.net.named_parameters() if ".lora_" not in n)

    @property
    def size_divisor(self) -> int:
        return self.net.size_divisor

    def for_expert(self, expert: int | None) -> tuple[torch.nn.Module, int | None]:
        """The network that runs expert index ``expert`` (-1: the shared base; None: a model without
        experts) and the routing index to run it with (None: no routing)."""
        return self.net, expert

    def to(self, device: torch.device | str) -> LoadedModel:
        self.net.to(device).eval()
        return self


class ExportedModel(LoadedModel):
    """An export directory seen as a :class:`LoadedModel`: each expert is its own merged network."""

    def __init__(self, exported: ExportedExperts, runtime: str = "torch") -> None:
        self.exported = exported
        base = exported.base_net()
        super().__init__(
            base, exported.prompts, "experts", list(exported.experts), exported.region_map, exported.data, exported.source,
            identity=exported.identity,
        )  # fmt: skip
        self.runtime = runtime
        self.onnx = {r: exported.onnx_expert(r) for r in self.experts} if runtime == "onnx" else {}

    @property
    def fixed_window(self) -> tuple[int, ...] | None:
        """The window every ONNX expert was exported for (None with the torch runtime)."""
        windows = {expert.window for expert in self.onnx.values()}
        if len(windows) > 1:
            raise ValueError(f"{self.source}: the ONNX experts were exported for different windows {sorted(windows)}")
        return windows.pop() if windows else None

    @property
    def parameter_count(self) -> int:
        return self.exported.parameter_count

    def for_expert(self, expert: int | None) -> tuple[torch.nn.Module, int | None]:
        if expert is None or expert < 0:
            return self.net, None
        if self.onnx:
            return self.onnx[self.experts[expert]], None
        return self.exported.net(self.experts[expert]), None

    def to(self, device: torch.device | str) -> LoadedModel:
        self.exported.to(device)
        self.net.to(device).eval()
        return self


class CheckpointError(ValueError):
    """A checkpoint file that torch cannot read (random bytes, truncated, not a checkpoint)."""


def _reason(exc: Exception) -> str:
    """torch's own reason in one line, without its advice to re-run unsafely or to file an issue."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line.split(". ")[0].rstrip(".")


def _content(path: str | Path) -> str | None:
    """What a file that torch cannot read holds, when it is not a checkpoint at all (None: it begins like one,
    a zip archive or a pickle, so torch's own reason is the cause)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is neither a zip archive nor a pickle (it begins with the bytes {head[:8].hex(' ')})"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file (it begins {text[:24]!r}), not a torch checkpoint (a zip archive)"
    return f"it is neither a zip archive nor a pickle (it begins with the bytes {head[:8].hex(' ')})"


def _read(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The checkpoint and the identity of the bytes loaded."""
    try:
        return read_checkpoint_identity(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle, zip and torch errors of many types
        raise CheckpointError(f"{path} is not a readable checkpoint: {_content(path) or _reason(exc)}") from None


def read_source(
    path: str | Path,
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    net_overrides: Mapping[str, Any] | None = None,
    student_preset: str | None = None,
    teacher_checkpoint: str | Path | None = None,
    text_encoder: bool = False,
) -> SourceRecord:
    """The record of the checkpoint file at ``path`` and its tensors, nothing built: our checkpoint, an
    official SAT vision file or an official LoRKD file, each by its own reader (arguments: see
    :func:`load_model`; ``text_encoder``: the caller gives an official SAT file's built text encoder)."""
    raw, identity = _read(path)
    source = str(path)
    meta = schema.read(raw, source)
    if meta is not None:
        if meta.kind == "sat" and net_overrides:
            meta = replace(meta, net={**meta.net, **net_overrides})
        return SourceRecord(meta, Provenance(source, "checkpoint", identity), raw["state_dict"])
    state = raw.get("model_state_dict", raw)
    if is_lorkd_official(state):
        if not (text_checkpoint and language_model_path):
            raise ValueError(
                f"{path} is an official LoRKD checkpoint: also give its paired text encoder (text_checkpoint=...) "
                "and a local BioLORD-2023-C folder (language_model_path=...)"
            )
        record = read_lorkd_official(
            state, Provenance(source, "official-lorkd", identity), text_checkpoint, language_model_path, student_preset,
            teacher_checkpoint=teacher_checkpoint, net_overrides=net_overrides,
        )  # fmt: skip
        if file_identity(path) != identity:  # its fingerprint read the file again
            raise CheckpointError(f"{path} changed while it was read: load it again once it is fully written")
        return record
    if not text_encoder and not (text_checkpoint and language_model_path):
        raise ValueError(
            f"{path} is an official SAT vision checkpoint: also give its paired text encoder "
            "(text_checkpoint=...) and a local language model folder (language_model_path=...)"
        )
    provenance = Provenance(source, "official-sat", identity)
    return read_official_sat(raw, provenance, None if text_encoder else text_checkpoint, language_model_path, net_overrides)


def load_model(
    path: str | Path,
    network: str = "experts",
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    net_overrides: Mapping[str, Any] | None = None,
    text_encoder: TextEncoder | None = None,
    student_preset: str | None = None,
    teacher_checkpoint: str | Path | None = None,
    runtime: str = "torch",
    plain_experts: bool = False,
) -> LoadedModel:
    """Read the source at ``path`` (see module docstring) and build its network and prompt bank once, in eval mode.

    Official files record no text encoder and not all of their architecture: ``text_checkpoint`` and
    ``language_model_path`` (or, for an official SAT file, a built ``text_encoder``) give it, ``net_overrides``
    the architecture arguments their keys do not hold (e.g. ``decoder_heads``); ``student_preset`` and
    ``teacher_checkpoint`` as in :func:`~lorkd.checkpoints.lorkd_official.read_lorkd_official`.
    ``runtime="onnx"``: an export's experts run their ``model.onnx`` with onnxruntime (``lorkd-export ... onnx=true``).
    ``plain_experts=True``: a LoRKD student's experts are the peft-free layers of :mod:`lorkd.experts.plain` (same
    outputs; for inference, which then does not import peft); True (training, export): peft adapters.
    """
    if network not in ("experts", "teacher"):
        raise ValueError(f"network must be 'experts' or 'teacher', got {network!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if Path(path).is_dir():
        if network != "experts":
            raise ValueError(f"{path} is an export directory: it holds region experts, not the teacher")
        return ExportedModel(load_export(path), runtime)
    if runtime != "torch":
        raise ValueError(f"runtime={runtime!r} needs an export directory written with `lorkd-export ... onnx=true`, not {path}")
    record = read_source(
        path, text_checkpoint, language_model_path, net_overrides, student_preset, teacher_checkpoint, text_encoder is not None
    )  # fmt: skip
    if record.meta.kind == "lorkd" and network == "teacher":
        return _teacher_of(record)
    # a built text encoder stands in for an official SAT file's missing one; our checkpoints carry their own
    return loaded_model(record, plain_experts, text_encoder if record.provenance.reader == "official-sat" else None)


def loaded_model(record: SourceRecord, plain_experts: bool = False, text_encoder: TextEncoder | None = None) -> LoadedModel:
    """The :class:`LoadedModel` of a record: :func:`~lorkd.checkpoints.build.build`, once."""
    net, prompts = build(record, plain_experts, text_encoder)
    meta, provenance = record.meta, record.provenance
    if provenance.reader == "official-lorkd":
        meta = converted_meta(record, net, prompts)
    region_map = RegionMap(**meta.region_map) if meta.region_map else None
    network = "experts" if meta.kind == "lorkd" else "teacher"
    experts = list(meta.experts.regions) if meta.experts is not None else []
    official = provenance.reader == "official-sat"
    return LoadedModel(
        net, prompts, network, experts, region_map, dict(meta.data), provenance.source, meta=None if official else meta,
        identity=provenance.identity,
    )  # fmt: skip


def _teacher_of(record: SourceRecord) -> LoadedModel:
    """The teacher a LoRKD record was distilled from (its file, fingerprint checked), with the student's
    prompts, region map and preprocessing."""
    path, meta = record.provenance.source, record.meta
    saved = meta.teacher
    if saved is None:
        raise ValueError(f"{path} does not record the teacher it was distilled from (network=teacher needs it)")
    if not Path(saved.path).is_file():
        raise FileNotFoundError(
            f"the teacher {path} was distilled from ({saved.path}) does not exist: network=teacher (and "
            "routing.fallback=teacher) read it from there; put it back or use the experts"
        )
    prompts = build_prompts(record)
    teacher = load_teacher(saved.path, _overrides(saved.net), prompts.text_encoder)
    if teacher.fingerprint != saved.fingerprint:
        raise ValueError(f"teacher file {saved.path} changed since {path} was distilled from it")
    region_map = RegionMap(**meta.region_map) if meta.region_map else None
    return replace(
        teacher, prompts=prompts, region_map=region_map, data=dict(meta.data), loaded_from=path,
        identity=record.provenance.identity,
    )  # fmt: skip


def _overrides(net_config: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments an official file does not record (its architecture is read off the keys)."""
    return {k: net_config[k] for k in ("decoder_heads", "dropout", "latent_stride") if k in net_config}


def load_teacher(
    path: str | Path | None, net_overrides: Mapping[str, Any] | None = None, text_encoder: TextEncoder | None = None
) -> LoadedModel:
    """A SAT teacher (SATModule checkpoint, or an official SAT vision file with the built ``text_encoder``: a
    SATModule checkpoint carries its own) with the fingerprint of its file, for distillation."""
    if path is None:
        raise ValueError("no teacher checkpoint: a LoRKD model is distilled from a SAT teacher (teacher.checkpoint=PATH)")
    loaded = load_model(path, "teacher", net_overrides=net_overrides, text_encoder=text_encoder)
    if loaded.meta is not None and loaded.meta.kind != "sat":
        raise ValueError(f"{path} is a {loaded.meta.kind!r} checkpoint; a teacher must be a SAT model")
    return replace(loaded, fingerprint=file_fingerprint([Path(path)]))


def _lorkd_checkpoint(path: str | Path) -> tuple[Any, CheckpointMeta]:
    raw, _ = _read(path)
    meta = schema.read(raw, str(path))
    if meta is None or meta.kind != "lorkd":
        raise ValueError(f"{path} is not a LoRKD checkpoint of this project (convert an official file first)")
    return raw, meta


def read_student_state(path: str | Path | None) -> dict[str, torch.Tensor] | None:
    """The student (base and experts) of our LoRKD checkpoint at ``path``, to start a training from
    (``model.student_state.path``); None without a path."""
    if path is None:
        return None
    return sub_state(_lorkd_checkpoint(path)[0]["state_dict"], "student.")


def read_student_network(path: str | Path) -> SAT:
    """The plain student network (no experts, fresh weights) of our LoRKD checkpoint, built as it records
    (``configs/model/lorkd_finetune.yaml``: fine-tuning needs no architecture repeated on the command line)."""
    return build_network(_lorkd_checkpoint(path)[1].net)


def read_experts_spec(path: str | Path, new_region: str | None = None, new_region_rank: int | None = None) -> schema.ExpertsSpec:
    """The experts spec our LoRKD checkpoint records; with ``new_region_rank``, ``new_region`` appended as a
    brand-new expert of that encoder rank (``experiment=finetune model.new_region_rank=R``)."""
    meta = _lorkd_checkpoint(path)[1]
    experts = meta.experts
    assert experts is not None  # schema.read refuses a LoRKD checkpoint without one
    if new_region_rank is None:
        return experts
    check_new_region(path, meta, new_region, new_region_rank)
    assert new_region is not None
    return replace(experts, regions=[*experts.regions, new_region], ranks={**experts.ranks, new_region: int(new_region_rank)})


def check_new_region(path: str | Path, meta: CheckpointMeta, region: str | None, rank: int | None) -> None:
    """Fail unless ``region`` can be added to the checkpoint's experts as a new one of ``rank``."""
    if not isinstance(region, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", region):
        raise ValueError(f"new region {region!r}: a region name is lower-case letters, digits and '_' (e.g. kidney_cysts)")
    known = set(meta.experts.regions if meta.experts else ()) | set((meta.region_map or {}).get("labels", {}))
    if region in known:
        raise ValueError(
            f"{path}: the checkpoint already has a region {region!r}; fine-tune it without model.new_region_rank, "
            "or name a new one"
        )
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"new region {region!r}: its rank must be a positive integer, got {rank!r}")


def read_training_data(path: str | Path, key: str) -> Any:
    """``key`` of what our LoRKD checkpoint records of its training data (``preprocess``, ``patch_size``)."""
    data = _lorkd_checkpoint(path)[1].data
    if key not in data:
        raise ValueError(f"{path}: the checkpoint records no data.{key}")
    return data[key]


def read_prompt_labels(path: str | Path) -> list[str]:
    """The labels of our LoRKD checkpoint's prompt bank: those it was trained on (fine-tuning keeps them, LwF)."""
    return list(_lorkd_checkpoint(path)[1].prompt_bank.get("labels", []))


def read_learned_queries(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained queries of our LoRKD checkpoint's prompt bank (labels added by earlier fine-tunes)."""
    return dict(_lorkd_checkpoint(path)[1].prompt_bank.get("learned", {}))


def read_region_map(path: str | Path, new_region: str | None = None, new_region_rank: int | None = None) -> RegionMap:
    """The region map our LoRKD checkpoint was trained with (labels added by earlier fine-tunes included); with
    ``new_region_rank``, ``new_region`` appended as a region with an expert and no labels yet (see read_experts_spec)."""
    meta = _lorkd_checkpoint(path)[1]
    if not meta.region_map:
        raise ValueError(f"{path}: the checkpoint records no region map")
    if new_region_rank is None:
        return RegionMap(**meta.region_map)
    check_new_region(path, meta, new_region, new_region_rank)
    return RegionMap(**{**meta.region_map, "regions": [*meta.region_map["regions"], new_region]})

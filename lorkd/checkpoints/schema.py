"""What a LoRKD or SAT checkpoint of this project records about itself (``checkpoint["lorkd"]``), and the
record every source is read into (:class:`SourceRecord`).

One typed record, written by :func:`write` (training modules, the official-LoRKD converter) and read
by :func:`read` (teacher loading, prediction loading, export, resume). The readers of
:mod:`lorkd.checkpoints.loading` turn each source kind (our checkpoint, an official SAT file, an official
LoRKD file) into a :class:`SourceRecord`: this record, its provenance and its tensors, nothing built;
:func:`lorkd.checkpoints.build.build` turns any of them into the network and its prompt bank. Version 1 is the layout every
checkpoint has had so far; a file without a ``version`` field is version 1. A newer version, an
unknown kind or a missing field is a clear error naming the file.

An export folder (:mod:`lorkd.checkpoints.export`) records itself in typed records too: its
:class:`ExportIndex` (``index.json``), one :class:`ModelCard` per region (``model_card.json``) and the
:class:`AdapterSpec` of its peft adapters (``adapters/experts.json``); each is read by ``from_json``
(the format and every required field checked, errors naming the file) and written by ``to_json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

KEY = "lorkd"
VERSION = 1
EXPORT_FORMAT = "lorkd-export/1"
CARD_FORMAT = "lorkd-expert/1"
ADAPTERS_FORMAT = "lorkd-adapters/1"
KINDS = ("sat", "lorkd")
# SAT's training crop: the patch size recorded for official files and used for files that record none
SAT_PATCH_SIZE = (288, 288, 96)
# SAT's preprocessing as plain values (``lorkd.data.transforms.PreprocessConfig().to_dict()``): recorded for
# official files, whose converter imports no ``lorkd.data``
SAT_PREPROCESS = {
    "orientation": "RAS", "spacing": [1.0, 1.0, 3.0], "crop_foreground": True, "crop_margin_mm": 0.0,
    "ct_window": [-500.0, 1000.0], "percentiles": [0.5, 99.5], "interpolation": "bilinear", "nan_policy": "error",
}  # fmt: skip


@dataclass(frozen=True)
class TextHead:
    """The trainable text head (projection of the language model's embedding to query space)."""

    hidden_dim: int
    query_dim: int
    proj_hidden: int
    language_model_path: str | None = None  # None: the prompt bank holds every prompt, no tower needed
    max_length: int = 64

    @classmethod
    def of(cls, encoder: Any) -> TextHead:
        """The record of a :class:`lorkd.models.text.TextEncoder`."""
        lm = encoder.language_model
        return cls(
            hidden_dim=encoder.hidden_dim,
            query_dim=encoder.query_dim,
            proj_hidden=encoder.projection_layer[0].out_features,
            language_model_path=lm.path if lm is not None else None,
            max_length=lm.max_length if lm is not None else 64,
        )


@dataclass(frozen=True)
class ExpertsSpec:
    """The region experts: the arguments of :func:`lorkd.experts.add_region_experts`."""

    regions: list[str]
    ranks: dict[str, int]
    decoder_rank_factor: int = 2
    scaling: float = 2.0
    style: str = "peft"
    train_base: bool = True

    @classmethod
    def for_regions(cls, regions: Sequence[str], ranks: Mapping[str, int], **options: Any) -> ExpertsSpec:
        """One expert per region of ``regions`` with its rank in ``ranks`` (other regions' ranks are left out);
        ``options``: the other fields (Hydra's ``_target_`` for ``model.experts``)."""
        missing = [r for r in regions if r not in ranks]
        if missing:
            raise KeyError(f"no expert rank configured for regions {missing}")
        return cls(list(regions), {r: int(ranks[r]) for r in regions}, **options)

    def arguments(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TeacherSource:
    """The SAT file a LoRKD student was distilled from."""

    path: str
    fingerprint: str
    net: dict[str, Any]  # SAT arguments


@dataclass(frozen=True)
class CheckpointMeta:
    kind: str  # "sat" (a teacher) | "lorkd" (a student with region experts)
    text_encoder: TextHead
    prompt_bank: dict[str, Any]  # PromptBank.state_dict()
    net: dict[str, Any] = field(default_factory=dict)  # SAT arguments of the stored network
    region_map: dict[str, Any] | None = None  # RegionMap.to_dict()
    data: dict[str, Any] = field(default_factory=dict)  # preprocessing, patch size, ... (DataModule.describe)
    experts: ExpertsSpec | None = None  # kind "lorkd"
    teacher: TeacherSource | None = None  # kind "lorkd", when known
    parameter_counts: dict[str, int] = field(default_factory=dict)
    converted_from: dict[str, Any] | None = None  # an official LoRKD file: its path, fingerprint, preset
    version: int = VERSION


@dataclass(frozen=True)
class Provenance:
    """Where a record's tensors come from."""

    source: str  # the file whose weights these are
    reader: str  # "checkpoint" | "official-sat" | "official-lorkd"
    identity: dict[str, Any] = field(default_factory=dict)  # file_identity of the bytes read (predict's resume key)


@dataclass
class SourceRecord:
    """What a reader returns: the record of a source (architecture ``meta.net``, ``meta.experts``, text head
    ``meta.text_encoder``, prompts ``meta.prompt_bank``, region map, preprocessing ``meta.data``), its
    provenance and its tensors, nothing built.

    ``tensors``: the network's under ``net.`` (kind ``sat``) or ``student.`` (kind ``lorkd``), the text
    head's under ``text_encoder.``, a paired language model's weights under ``language_model.`` (official
    text encoders); ``explained``: keys of the file the reader accounted for without loading them (aliases,
    split tensors), which the build's strict key report lists; ``encode``: prompts the build encodes with
    the language model into the bank (an official file's region-map labels), after which the bank holds every
    prompt and the language model is let go (as in a converted checkpoint).
    """

    meta: CheckpointMeta
    provenance: Provenance
    tensors: dict[str, Any]
    explained: dict[str, str] = field(default_factory=dict)
    encode: list[str] = field(default_factory=list)


_NESTED = {"text_encoder": TextHead, "experts": ExpertsSpec, "teacher": TeacherSource}


def to_dict(meta: CheckpointMeta) -> dict[str, Any]:
    """Plain data (what ``torch.save`` stores and ``weights_only=True`` loads)."""
    return {k: v for k, v in asdict(meta).items() if v is not None}


def write(checkpoint: dict[str, Any], meta: CheckpointMeta) -> dict[str, Any]:
    """Store ``meta`` in ``checkpoint`` (in place); returns ``checkpoint``."""
    checkpoint[KEY] = to_dict(meta)
    return checkpoint


def read(checkpoint: Any, source: str) -> CheckpointMeta | None:
    """The record of a loaded checkpoint; None when it has none (an official SAT or LoRKD file)."""
    raw = checkpoint.get(KEY) if isinstance(checkpoint, Mapping) else None
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: checkpoint['{KEY}'] is a {type(raw).__name__}, not a mapping")
    version = raw.get("version", 1)
    if version != VERSION:
        raise ValueError(
            f"{source}: checkpoint metadata version {version!r} is not supported (this lorkd reads version {VERSION}; "
            "a newer lorkd wrote it?)"
        )
    if raw.get("kind") not in KINDS:
        raise ValueError(f"{source}: unknown checkpoint kind {raw.get('kind')!r} (expected one of {KINDS})")
    known = {f.name for f in fields(CheckpointMeta)}
    values = {k: v for k, v in raw.items() if k in known}
    try:
        for name, cls in _NESTED.items():
            if values.get(name) is not None:
                values[name] = cls(**values[name])
        meta = CheckpointMeta(**values)
    except TypeError as exc:
        raise ValueError(f"{source}: malformed checkpoint metadata ({exc})") from None
    if meta.kind == "lorkd" and meta.experts is None:
        raise ValueError(f"{source}: a LoRKD checkpoint without its experts spec")
    return meta


def patch_size(data: Mapping[str, Any]) -> tuple[int, ...]:
    """The training patch size a data description (``CheckpointMeta.data``, an export's ``data``) records, else SAT's."""
    return tuple(int(s) for s in data.get("patch_size") or SAT_PATCH_SIZE)


def _json_fields(cls: type, raw: Any, source: str, fmt: str) -> dict[str, Any]:
    """The fields of ``cls`` in ``raw`` (a JSON object of format ``fmt``): unknown keys dropped, a missing
    required one, another format or a non-object a ``ValueError`` naming ``source``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: a JSON object expected, got {type(raw).__name__}")
    if raw.get("format") != fmt:
        raise ValueError(f"{source}: format {raw.get('format')!r}, expected {fmt!r}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - raw.keys())
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)} (written by another lorkd, or edited?)")
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in known}


@dataclass(frozen=True)
class DeployedExpert:
    """A model card's expert: the LoRA weights merged into the base of its ``model.safetensors``."""

    style: str
    scaling: float
    rank: int
    decoder_rank: int
    decoder_rank_factor: int
    parameters: int  # the expert's own (LoRA) parameters
    merged_into_base: bool = True
    trained_base: bool = True


@dataclass(frozen=True)
class ModelCard:
    """``<export>/<region>/model_card.json``: one deployed expert, readable without the rest of the export."""

    region: str
    expert_index: int
    architecture: dict[str, Any]  # {"class", "preset", "arguments": SAT arguments}
    expert: DeployedExpert
    labels: dict[str, list[str]]  # routed, with_cached_prompt, abnormal (``<modality>_<label>``)
    data: dict[str, Any]  # preprocessing, patch size (as CheckpointMeta.data)
    text_encoder: dict[str, Any]  # TextHead fields + "file"
    prompt_bank: dict[str, Any]  # file, fingerprint, number of labels
    parameter_counts: dict[str, Any]  # model, teacher, ratio_to_teacher
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, fingerprint, teacher, converted_from
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = CARD_FORMAT

    @property
    def text_head(self) -> TextHead:
        return TextHead(**{k: v for k, v in self.text_encoder.items() if k != "file"})

    @classmethod
    def from_json(cls, raw: Any, source: str) -> ModelCard:
        values = _json_fields(cls, raw, source, CARD_FORMAT)
        try:
            return cls(**{**values, "expert": DeployedExpert(**values["expert"])})
        except TypeError as exc:
            raise ValueError(f"{source}: malformed model card ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportIndex:
    """``<export>/index.json``: the regions exported and the sha256 of every card and shared file."""

    expert_order: list[str]  # exported regions in expert index order
    regions: dict[str, str]  # region -> its folder
    cards_sha256: dict[str, str]
    shared_files: dict[str, dict[str, Any]]  # text head and prompt bank, equal in every region folder
    architecture: dict[str, Any]
    parameter_counts: dict[str, Any]  # the checkpoint's, plus "model": one deployed expert's
    data: dict[str, Any]
    base: dict[str, str]  # {"file", "sha256"} of the shared base W0
    adapters: str  # the folder of the peft adapters
    region_map: dict[str, Any] | None = None
    onnx: dict[str, dict[str, Any]] = field(default_factory=dict)  # region -> {file, sha256, window, opset}
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = EXPORT_FORMAT

    @classmethod
    def from_json(cls, raw: Any, source: str) -> ExportIndex:
        return cls(**_json_fields(cls, raw, source, EXPORT_FORMAT))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not (k == "onnx" and not v)}


@dataclass(frozen=True)
class AdapterSpec:
    """``<export>/adapters/experts.json``: the shared base, one peft adapter per expert and their sha256."""

    architecture: dict[str, Any]
    experts: ExpertsSpec
    files: dict[str, dict[str, str]]  # file -> {"sha256"}
    format: str = ADAPTERS_FORMAT

    @classmethod
    def from_json(cls, raw: Any, source: str) -> AdapterSpec:
        values = _json_fields(cls, raw, source, ADAPTERS_FORMAT)
        try:
            return cls(**{**values, "experts": ExpertsSpec(**values["experts"])})
        except TypeError as exc:
            raise ValueError(f"{source}: malformed adapter spec ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

"""What a LoRKD or SAT checkpoint of this project records about itself (``checkpoint["lorkd"]``), and the
record every source is read into (:class:`SourceRecord`).

One typed record, written by :func:`write` (training modules, the official-LoRKD converter) and read
by :func:`read` (teacher loading, prediction loading, export, resume). The readers of
:mod:`lorkd.checkpoints.loading` turn each source kind (our checkpoint, an official SAT file, an official
LoRKD file) into a :class:`SourceRecord`: this record, its provenance and its tensors, nothing built;
:func:`lorkd.checkpoints.build.build` turns any of them into the network and its prompt bank. Version 1 is the layout every
checkpoint has had so far; a file without a ``version`` field is version 1. A newer version, an
unknown kind or a missing field is a clear error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

KEY = "lorkd"
VERSION = 1
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

"""Read expert exports: standalone SAT models with one region expert merged into W0 (no peft needed).

Layout written by :mod:`lorkd.checkpoints.export`::

    DIR/index.json                      regions -> folders, region map, preprocessing, source, sha256 of each card
    DIR/<region>/model.safetensors      a plain ``SAT`` (backbone: ``PlainConvUNet``) with the expert merged
    DIR/<region>/text_head.safetensors  the text head (``projection_layer.*``, ``modality_embed.weight``)
    DIR/<region>/prompts.safetensors    the prompt bank: label -> pooled language-model embedding
    DIR/<region>/model_card.json        architecture, expert, labels, preprocessing, versions, sha256 of the files
    DIR/adapters/                       the shared base (``base.safetensors``) + peft adapters, for fine-tuning

Usage::

    experts = load_export("exports/demo")
    net = experts.net("abdomen")                      # SAT in eval mode, loaded (sha256-checked) on first use
    queries = experts.prompts.queries(["liver"], "ct")
    logits = net(image, queries)                      # (B, N, H, W, D)
    experts.region_map.region_of("liver", "ct")       # -> "abdomen"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints.build import build_network
from lorkd.checkpoints.read import build_text_encoder_from_meta
from lorkd.checkpoints.schema import ExportIndex, ModelCard
from lorkd.io import sha256_file
from lorkd.models.sat import SAT
from lorkd.prompts import PromptBank
from lorkd.regions import RegionMap

INDEX = "index.json"
CARD = "model_card.json"
MODEL = "model.safetensors"
TEXT_HEAD = "text_head.safetensors"
PROMPTS = "prompts.safetensors"
LEARNED = "learned query: "  # prefix of a trained query's key (a prompt in PROMPTS is a label, never this)
ADAPTERS = "adapters"
BASE = "base.safetensors"


class ExportIntegrityError(RuntimeError):
    """A file of an export does not match the sha256 recorded for it (modified or corrupted)."""


def verify_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the export")
    actual = sha256_file(path)
    if actual != expected:
        raise ExportIntegrityError(
            f"{path}: sha256 {actual} does not match the recorded {expected}; the file was modified or corrupted"
        )


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a LoRKD expert export?)")
    return path.read_bytes()


def read_json(path: Path) -> Any:
    try:
        return json.loads(_read_bytes(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def verify_files(folder: Path, files: Mapping[str, Mapping[str, Any]], names: Sequence[str] | None = None) -> None:
    """sha256-check ``names`` (default: all) of a ``{"file": {"sha256": ...}}`` listing."""
    for name in files if names is None else names:
        verify_file(folder / name, files[name]["sha256"])


def read_card(folder: str | Path, verify: bool = True) -> ModelCard:
    """The model card of one exported expert; with ``verify``, every file it lists is sha256-checked."""
    folder = Path(folder)
    card = ModelCard.from_json(read_json(folder / CARD), str(folder / CARD))
    if verify:
        verify_files(folder, card.files)
    return card


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_plain_sat(path: Path, arguments: Mapping[str, Any], device: str | torch.device = "cpu") -> SAT:
    """A plain ``SAT(**arguments)`` with every tensor of ``path`` loaded (strict key accounting), in eval mode."""
    return build_network(arguments, state=_load_safetensors(path), report=str(path)).to(device).eval()


def load_prompts(folder: Path, card: ModelCard) -> PromptBank:
    """The prompt bank of an exported expert: its text head + the cached prompt embeddings."""
    from safetensors import safe_open

    encoder = build_text_encoder_from_meta(card.text_head, _load_safetensors(folder / TEXT_HEAD), str(folder / TEXT_HEAD))
    bank = PromptBank(encoder.requires_grad_(False))
    path = folder / PROMPTS
    with safe_open(str(path), framework="pt") as f:
        labels = sorted(k for k in f.keys() if not k.startswith(LEARNED))
        embeddings = [f.get_tensor(k) for k in labels]
        learned = {k.removeprefix(LEARNED): f.get_tensor(k) for k in f.keys() if k.startswith(LEARNED)}
    bank.load_state_dict({
        "fingerprint": card.prompt_bank["fingerprint"],
        "labels": labels,
        "embeddings": torch.stack(embeddings) if embeddings else torch.zeros(0),
        "learned": learned,
    })  # fmt: skip
    return bank


@dataclass
class ExportedExpert:
    """One region's standalone model (expert merged into W0) and its card."""

    region: str
    net: SAT
    card: ModelCard
    folder: Path

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def load_expert_folder(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> ExportedExpert:
    """One exported region folder on its own (card, sha256 check, plain SAT)."""
    folder = Path(folder)
    card = read_card(folder, verify)
    net = load_plain_sat(folder / MODEL, card.architecture["arguments"], device)
    return ExportedExpert(card.region, net, card, folder)


@dataclass
class ExportedExperts:
    """An export directory: one merged standalone model per region, sharing prompts, region map and preprocessing.

    ``experts`` lists the exported regions in expert index order. Networks load on first use of
    :meth:`net` (sha256 checked) and stay cached; ``prompts`` is the export's :class:`PromptBank`.
    """

    root: Path
    index: ExportIndex
    experts: list[str]
    prompts: PromptBank
    region_map: RegionMap | None
    data: dict[str, Any]
    source: str
    device: torch.device = torch.device("cpu")
    verify: bool = True
    identity: dict[str, Any] = field(default_factory=dict)  # folder and sha256 of the index.json read
    _loaded: dict[str, ExportedExpert] = field(default_factory=dict, repr=False)

    def folder(self, region: str) -> Path:
        if region not in self.index.regions:
            raise KeyError(f"{self.root}: no exported expert {region!r}; exported: {self.experts}")
        return self.root / self.index.regions[region]

    def expert(self, region: str) -> ExportedExpert:
        """The region's merged model and card (loaded and verified on first call)."""
        if region not in self._loaded:
            folder = self.folder(region)
            card_sha = self.index.cards_sha256[region]
            if self.verify:
                verify_file(folder / CARD, card_sha)
            loaded = load_expert_folder(folder, self.device, self.verify)
            shared = self.index.shared_files
            if any(loaded.card.files[name] != entry for name, entry in shared.items()):
                raise ExportIntegrityError(f"{folder}: its text head or prompt bank differs from the rest of {self.root}")
            self._loaded[region] = loaded
        return self._loaded[region]

    def net(self, region: str) -> SAT:
        """Plain ``SAT`` with ``region``'s expert merged into W0, in eval mode on ``device``."""
        return self.expert(region).net

    def card(self, region: str) -> ModelCard:
        """The region's model card, read without loading (or sha256-checking) its weights."""
        return read_card(self.folder(region), verify=False)

    def base_net(self) -> SAT:
        """The student's shared base W0 without any expert (from ``adapters/base.safetensors``)."""
        entry = self.index.base
        path = self.root / entry["file"]
        if self.verify:
            verify_file(path, entry["sha256"])
        return load_plain_sat(path, self.index.architecture["arguments"], self.device)

    def onnx_expert(self, region: str) -> torch.nn.Module:
        """The region's ``model.onnx`` (``lorkd-export ... onnx=true``) in an onnxruntime session, sha256-checked."""
        from lorkd.checkpoints.onnx import OnnxExpert

        entry = self.onnx_entry(region)
        path = self.folder(region) / entry["file"]
        if self.verify:
            verify_file(path, entry["sha256"])
        return OnnxExpert(path, entry["window"])

    def onnx_entry(self, region: str) -> dict[str, Any]:
        """What ``index.json`` records of the region's ONNX file (file, sha256, window, opset)."""
        entry = self.index.onnx.get(region)
        if entry is None:
            raise FileNotFoundError(f"{self.root}: no ONNX model of {region!r}; export with `lorkd-export ... onnx=true`")
        return entry

    def to(self, device: str | torch.device) -> ExportedExperts:
        """Move the loaded networks and the text head; networks loaded later go there too."""
        self.device = torch.device(device)
        for loaded in self._loaded.values():
            loaded.net.to(self.device)
        self.prompts.text_encoder.to(self.device)
        return self

    @property
    def parameter_count(self) -> int:
        """Parameters of one deployed expert (every exported model has the student base's size)."""
        return int(self.index.parameter_counts["model"])


def _read_index(path: Path) -> tuple[ExportIndex, str]:
    """``index.json`` and the sha256 of the bytes read: it records the sha256 of every file loaded from
    the export (each expert is checked against it), so it identifies the weights, unlike sizes and mtimes."""
    data = _read_bytes(path)
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return ExportIndex.from_json(raw, str(path)), hashlib.sha256(data).hexdigest()


def load_export(
    path: str | Path,
    regions: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    preload: bool = False,
) -> ExportedExperts:
    """Open an export directory written by ``lorkd-export``; no peft involved.

    ``regions`` restricts it to some experts; ``preload`` loads their networks now instead of on first use;
    ``verify`` checks every file against the sha256 recorded at export time (:class:`ExportIntegrityError`).
    """
    root = Path(path)
    index, index_sha256 = _read_index(root / INDEX)
    exported = list(index.expert_order)
    chosen = exported if regions is None else list(regions)
    unknown = [r for r in chosen if r not in exported]
    if unknown:
        raise KeyError(f"{root}: no exported expert for {unknown}; exported: {exported}")
    chosen = [r for r in exported if r in chosen]  # keep expert index order
    if not chosen:
        raise ValueError(f"{root}: no region selected")
    first = root / index.regions[chosen[0]]
    if verify:
        verify_file(first / CARD, index.cards_sha256[chosen[0]])
        verify_files(first, index.shared_files)
    card = read_card(first, verify=False)
    region_map = RegionMap(**index.region_map) if index.region_map else None
    experts = ExportedExperts(
        root=root,
        index=replace(index, regions={r: index.regions[r] for r in chosen}),
        experts=chosen,
        prompts=load_prompts(first, card),
        region_map=region_map,
        data=dict(index.data),
        source=str(root),
        device=torch.device(device),
        verify=verify,
        identity={"path": str(root.resolve()), "index_sha256": index_sha256},
    )
    experts.prompts.text_encoder.to(experts.device)
    if preload:
        for region in chosen:
            experts.expert(region)
    return experts


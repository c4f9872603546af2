"""Export a LoRKD checkpoint: per region a standalone SAT with that expert merged into W0, plus peft adapters.

Input: one of our LoRKD checkpoints, or an official ``lorkd-imbalance-{nano,pro}.pth`` (converted in memory
by :mod:`lorkd.checkpoints.lorkd_official`; needs its paired text encoder). Output layout and the loader:
:mod:`lorkd.checkpoints.exported`. The export is written into a temporary sibling folder and moved into
place at the end, so the target is either a complete export or untouched.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorkd.checkpoints import schema
from lorkd.checkpoints.adapters import plain_state, save_adapters
from lorkd.checkpoints.build import backbone_presets, build_network
from lorkd.checkpoints.exported import ADAPTERS, BASE, CARD, INDEX, LEARNED, MODEL, PROMPTS, TEXT_HEAD
from lorkd.checkpoints.loading import load_model
from lorkd.checkpoints.schema import CARD_FORMAT, CheckpointMeta, DeployedExpert, ExportIndex, ModelCard
from lorkd.experts import base_parameter_count, expert_parameter_counts
from lorkd.io import file_fingerprint, follow_umask, publish_folder, sha256_file, write_json
from lorkd.models.sat import window_size
from lorkd.regions import RegionMap

log = logging.getLogger(__name__)

def versions() -> dict[str, str]:
    import peft
    import safetensors

    try:
        lorkd_version = metadata.version("lorkd")
    except metadata.PackageNotFoundError:
        lorkd_version = "unknown (not installed)"
    return {
        "lorkd": lorkd_version, "torch": torch.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }  # fmt: skip


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _write_text_files(folder: Path, meta: CheckpointMeta, text_head: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The text head and the prompt bank (label -> pooled embedding) as safetensors; returns their file entries."""
    bank = meta.prompt_bank
    save_file({k: v.detach().contiguous() for k, v in text_head.state_dict().items()}, str(folder / TEXT_HEAD))
    embeddings = {label: emb.contiguous() for label, emb in zip(bank["labels"], bank["embeddings"])}
    embeddings.update({LEARNED + key: q.contiguous() for key, q in bank.get("learned", {}).items()})  # fine-tuned queries
    info = {"fingerprint": bank["fingerprint"]} if bank.get("fingerprint") else None
    save_file(embeddings, str(folder / PROMPTS), metadata=info)
    return {name: _file_entry(folder / name) for name in (TEXT_HEAD, PROMPTS)}


def region_labels(region_map: Mapping[str, Any] | None, region: str, prompted: Sequence[str]) -> dict[str, list[str]]:
    """Labels (``<modality>_<label>``) the region map routes to ``region``'s expert; those whose text is in the
    prompt bank (encoded during training/validation or by the teacher; the bank is keyed by text, not
    modality); and the lesions among them. Checkpoints do not record the training manifests themselves."""
    if not region_map:
        return {"routed": [], "with_cached_prompt": [], "abnormal": []}
    rmap = RegionMap(**region_map)
    labels = sorted(k for k, r in rmap.label_region.items() if r == region)
    cached = set(prompted)
    return {
        "routed": labels,
        "with_cached_prompt": [k for k in labels if k.split("_", 1)[1] in cached],
        "abnormal": [k for k in labels if k in rmap.abnormal],
    }


def _source_info(path: str | Path, meta: CheckpointMeta) -> dict[str, Any]:
    info: dict[str, Any] = {"checkpoint": str(Path(path).resolve()), "fingerprint": file_fingerprint([Path(path)])}
    if meta.teacher:
        info["teacher"] = {"path": meta.teacher.path, "fingerprint": meta.teacher.fingerprint}
    if meta.converted_from:
        info["converted_from"] = meta.converted_from
    return info


def model_card(
    region: str,
    meta: CheckpointMeta,
    architecture: Mapping[str, Any],
    model_parameters: int,
    expert_parameters: int,
    common: Mapping[str, Any],
    files: Mapping[str, Any],
) -> ModelCard:
    experts = meta.experts
    assert experts is not None
    rank = int(experts.ranks[region])
    factor = int(experts.decoder_rank_factor)
    teacher = meta.parameter_counts.get("teacher")
    bank = meta.prompt_bank
    return ModelCard(
        region=region,
        expert_index=list(experts.regions).index(region),
        architecture=dict(architecture),
        expert=DeployedExpert(
            style=experts.style, scaling=float(experts.scaling), rank=rank, decoder_rank=rank * factor,
            decoder_rank_factor=factor, parameters=expert_parameters, trained_base=bool(experts.train_base),
        ),
        labels=region_labels(meta.region_map, region, bank["labels"]),
        data=dict(meta.data),
        text_encoder={**asdict(meta.text_encoder), "file": TEXT_HEAD},
        prompt_bank={"file": PROMPTS, "fingerprint": bank.get("fingerprint"), "labels": len(bank["labels"])},
        parameter_counts={
            "model": model_parameters, "teacher": teacher,
            "ratio_to_teacher": model_parameters / teacher if teacher else None,
        },
        files=dict(files),
        **common,
    )  # fmt: skip


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output_dir= or pass overwrite=true")
    if not (out / INDEX).is_file():
        raise FileExistsError(f"{out} exists and is not an expert export (no {INDEX}); refusing to replace it")


def _export_onnx(
    arguments: Mapping[str, Any], state: Mapping[str, torch.Tensor], folder: Path, meta: CheckpointMeta, source: str
) -> dict[str, Any]:
    """``folder/model.onnx`` of one merged expert for windows of the training patch size."""
    from lorkd.checkpoints.onnx import ONNX_MODEL, export_onnx, onnx_entry

    net = build_network(arguments, state=state, report=source)
    window = window_size(schema.patch_size(meta.data), net.size_divisor)
    path = export_onnx(net, window, folder / ONNX_MODEL)
    log.info("exported %s as ONNX (windows of %s)", folder.name, "x".join(map(str, window)))
    return onnx_entry(path, window)


def export_experts(
    ckpt_path: str | Path,
    out: str | Path,
    regions: Sequence[str] | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    **official: Any,
) -> Path:
    """Write ``out/<region>/`` for every expert (or ``regions``), ``out/adapters/`` and ``out/index.json``.

    ``onnx``: also ``out/<region>/model.onnx`` (:mod:`lorkd.checkpoints.onnx`), recorded in ``index.json``.

    ``official``: for an official LoRKD file, ``text_checkpoint``, ``language_model_path`` and optionally
    ``student_preset``, ``teacher_checkpoint``, ``net_overrides`` (see :func:`~lorkd.checkpoints.loading.load_model`).
    """
    out = Path(out)
    _check_target(out, overwrite)
    loaded = load_model(ckpt_path, "experts", **official)
    meta = loaded.meta
    if meta is None or meta.experts is None:
        what = "an export directory" if Path(ckpt_path).is_dir() else f"a {meta.kind!r} checkpoint" if meta else "an official SAT file"
        raise ValueError(f"{ckpt_path} is {what}; export needs a LoRKD checkpoint with experts")
    student = loaded.net
    names = list(meta.experts.regions)
    chosen = names if regions is None else [r for r in names if r in set(regions)]
    unknown = sorted(set(regions or ()) - set(names))
    if unknown or not chosen:
        raise KeyError(f"{ckpt_path}: no expert for {unknown or regions}; experts: {names}")
    base_count = base_parameter_count(student)
    expert_counts = expert_parameter_counts(student.backbone)
    architecture = {"class": "lorkd.models.sat.SAT", "preset": next(iter(backbone_presets(student.config)), None), "arguments": student.config}
    common = {
        "source": _source_info(ckpt_path, meta),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shared = _write_text_files(stage, meta, loaded.prompts.text_encoder)
        cards: dict[str, str] = {}
        onnx_files: dict[str, dict[str, Any]] = {}
        for region in chosen:
            folder = stage / region
            folder.mkdir()
            state = plain_state(student, region)
            count = sum(v.numel() for v in state.values())
            if count != base_count:
                raise RuntimeError(f"merged {region} model has {count} parameters, the student base {base_count}")
            save_file(state, str(folder / MODEL), metadata={"format": CARD_FORMAT, "region": region})
            for name in shared:
                shutil.copyfile(stage / name, folder / name)
            files = {MODEL: _file_entry(folder / MODEL), **shared}
            card = model_card(region, meta, architecture, count, expert_counts[region], common, files)
            write_json(folder / CARD, card.to_json())
            cards[region] = sha256_file(folder / CARD)
            if onnx:
                onnx_files[region] = _export_onnx(student.config, state, folder, meta, str(ckpt_path))
            log.info("exported %s: %s parameters -> %s", region, f"{count:,}", out / region)
        for name in shared:
            (stage / name).unlink()
        spec = save_adapters(student, meta.experts, stage / ADAPTERS, architecture)
        index = ExportIndex(
            expert_order=chosen,
            regions={r: r for r in chosen},
            cards_sha256=cards,
            shared_files=shared,
            architecture=architecture,
            parameter_counts={**meta.parameter_counts, "model": base_count},
            region_map=meta.region_map,
            data=dict(meta.data),
            base={"file": f"{ADAPTERS}/{BASE}", "sha256": spec.files[BASE]["sha256"]},
            adapters=ADAPTERS,
            onnx=onnx_files,
            **common,
        )
        write_json(stage / INDEX, index.to_json())
        follow_umask(stage)
        publish_folder(stage, out)  # replaces an earlier export there (_check_target allowed it)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out

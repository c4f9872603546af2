"""``python predict.py``: predict every case of ``input`` into ``output_dir`` through ``Trainer.predict``.

One device runs the cases in order; ``trainer.devices=N`` (and ``trainer.num_nodes``) shards them,
each case exactly once. Prompts of every case are checked before anything runs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lorkd.data.manifest import Case
from lorkd.exit_codes import NotStarted
from lorkd.io import check_writable_folder, file_identity
from lorkd.utils import single_log_stream

if TYPE_CHECKING:
    from lorkd.inference.predictor import Predictor

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_prompts(predictor: Predictor, cases: Sequence[Case]) -> None:
    """Every case's labels route to a network and have a query; raise listing every problem at once."""
    problems: dict[tuple, str] = {}
    for case in cases:
        key = (tuple(case.labels), case.modality, case.region)
        if key in problems:
            continue
        try:
            predictor.check(case.labels, case.modality, case.region)
            problems[key] = ""
        except (KeyError, ValueError) as exc:
            problems[key] = f"{case.source}: case {case.id}: {exc}"
    bad = [p for p in problems.values() if p]
    if bad:
        raise ValueError(f"{len(bad)} prompt problem(s):\n" + "\n".join(bad))


def _prepare(cfg: DictConfig) -> tuple[list[Case], Predictor, dict[str, Any]]:
    """Everything checked before any case runs: inputs, output folder, checkpoint, prompts.

    Returns the cases, the predictor and the run's part of the resume key.
    """
    from lorkd.inference.dicom_seg import check_format
    from lorkd.inference.inputs import discover_cases
    from lorkd.inference.predictor import NEUTRAL_OPTIONS, Predictor

    cases = discover_cases(cfg.input, _plain(cfg.labels), cfg.modality, cfg.region, cfg.orientation)
    check_writable_folder(cfg.output_dir)
    check_format(cfg.writer.get("format", "nifti"), [case.image for case in cases])
    official = _plain(cfg.official)
    options = _plain(cfg.inference)
    predictor = Predictor.from_checkpoint(
        cfg.ckpt_path,
        model=cfg.model,
        text_checkpoint=official["text_checkpoint"],
        language_model_path=official["language_model_path"],
        net_overrides=official["net_overrides"],
        device="cpu",
        **options,
    )
    check_prompts(predictor, cases)
    settings = {
        "checkpoint": file_identity(cfg.ckpt_path),
        "model": cfg.model,
        "inference": {k: v for k, v in sorted(options.items()) if k not in NEUTRAL_OPTIONS},
        "official": official,
        "preview": bool(cfg.writer.preview),
        "probabilities": bool(cfg.writer.save_probabilities),
        "statistics": bool(cfg.writer.get("statistics", False)),
        "format": cfg.writer.get("format", "nifti"),
    }
    return cases, predictor, settings


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the prediction described by ``configs/predict.yaml``; returns the summary rows.

    Raises :class:`~lorkd.exit_codes.NotStarted` (one line) when the run cannot start.
    """
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from lorkd.data.datasets import CaseDataset, collate_case
    from lorkd.inference.module import PredictionModule

    single_log_stream()
    try:
        cases, predictor, settings = _prepare(cfg)
        writer = instantiate(cfg.writer)
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[writer])
        if len(cases) < trainer.world_size:
            raise ValueError(
                f"{len(cases)} case(s) for {trainer.world_size} processes: use at most {len(cases)} devices"
            )
    except Exception as exc:  # bad config, input, checkpoint or output folder: nothing ran
        log.debug("the run could not start", exc_info=True)
        raise NotStarted(str(exc)) from exc
    module = PredictionModule(
        predictor,
        cfg.output_dir,
        cfg.overwrite,
        cfg.writer.save_probabilities,
        progress=cfg.progress,
        settings=settings,
    )
    loader = DataLoader(CaseDataset(cases), batch_size=1, shuffle=False, collate_fn=collate_case)
    if trainer.is_global_zero:
        log.info(
            "predicting %d case(s) with %s into %s", len(cases), cfg.ckpt_path, Path(cfg.output_dir).resolve()
        )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if trainer.is_global_zero:
        report(writer.summary, Path(cfg.output_dir))
    return writer.summary


def report(rows: Sequence[dict[str, Any]], output_dir: Path) -> None:
    cases = {row["case"]: row["status"] for row in rows}
    counts = Counter(cases.values())
    log.info(
        "%d case(s): %d predicted, %d skipped (already complete), %d failed; summary: %s",
        len(cases), counts["ok"], counts["skipped"], counts["error"], output_dir / "summary.csv",
    )  # fmt: skip
    for row in rows:
        if row["status"] == "error":
            log.warning("failed case %s: %s", row["case"], row["error"])

"""``python predict.py``: predict every case of ``input`` into ``output_dir``.

One device runs the cases in order in this process, without Lightning; ``trainer.devices=N`` (and
``trainer.num_nodes``) shards them through ``Trainer.predict``, each case exactly once
(:mod:`lorkd.inference.case_runner` with :class:`~lorkd.inference.prediction_task.PredictionTask`).
Prompts of every case are checked before anything runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lorkd.data.manifest import Case
from lorkd.exit_codes import NotStarted
from lorkd.io import check_writable_folder, printable
from lorkd.utils import freeze_startup_objects, plain

if TYPE_CHECKING:
    from lorkd.inference.predictor import Predictor

log = logging.getLogger(__name__)


def predictor_options(cfg: DictConfig) -> dict[str, Any]:
    """The Predictor's options in a predict or eval config: ``inference.*`` and ``routing.fallback``."""
    return {**plain(cfg.inference), "fallback": plain(cfg.routing.fallback)}


def load_predictor(cfg: DictConfig) -> Predictor:
    """The Predictor of ``ckpt_path`` (network ``model``) with the config's options and ``official.*``
    (:meth:`Predictor.load <lorkd.inference.predictor.Predictor.load>`, as :func:`lorkd.api.load` and eval)."""
    from lorkd.inference.predictor import Predictor

    return Predictor.load(cfg.ckpt_path, cfg.network, device="cpu", **plain(cfg.official), **predictor_options(cfg))


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
            problems[key] = f"{printable(case.source)}: case {printable(case.id)}: {exc}"
    bad = [p for p in problems.values() if p]
    if bad:
        raise ValueError(f"{len(bad)} prompt problem(s):\n" + "\n".join(bad))


def _prepare(cfg: DictConfig) -> tuple[list[Case], Predictor, dict[str, Any]]:
    """Everything checked before any case runs: inputs, output folder, checkpoint, prompts.

    Returns the cases, the predictor and the run's part of the resume key.
    """
    from lorkd.inference.dicom_seg import check_format
    from lorkd.inference.inputs import discover_cases
    from lorkd.inference.predictor import NEUTRAL_OPTIONS

    cases = discover_cases(cfg.input, plain(cfg.labels), cfg.modality, cfg.region, cfg.orientation)
    check_writable_folder(cfg.output_dir)
    check_format(cfg.writer.get("format", "nifti"), [case.image for case in cases])
    predictor = load_predictor(cfg)
    options = predictor_options(cfg)
    check_prompts(predictor, cases)
    settings = {
        "checkpoint": predictor.model.identity,  # of the bytes loaded, not of the file now
        "network": cfg.network,
        "inference": {k: v for k, v in sorted(options.items()) if k not in NEUTRAL_OPTIONS},
        "official": plain(cfg.official),
        "preview": bool(cfg.writer.preview),
        "probabilities": bool(cfg.writer.save_probabilities),
        "statistics": bool(cfg.writer.get("statistics", False)),
        "format": cfg.writer.get("format", "nifti"),
    }
    return cases, predictor, settings


def _trainer(cfg: DictConfig) -> Any:
    from lorkd.inference.case_runner_lightning import make_trainer

    return make_trainer(cfg.trainer, use_distributed_sampler=False)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the prediction described by ``configs/predict.yaml``; returns the summary rows.

    Raises :class:`~lorkd.exit_codes.NotStarted` (one line) when the run cannot start.
    """
    from lorkd.inference.case_runner import run_cases, single_device
    from lorkd.inference.prediction_task import PredictionTask

    try:
        device = single_device(plain(cfg.trainer))  # one process: no Lightning
        cases, predictor, settings = _prepare(cfg)
        task = PredictionTask(predictor, cfg.output_dir, settings, **plain(cfg.writer))
        trainer = None if device is not None else _trainer(cfg)
    except Exception as exc:  # bad config, input, checkpoint or output folder: nothing ran
        log.debug("the run could not start", exc_info=True)
        raise NotStarted(str(exc)) from exc
    freeze_startup_objects()
    if trainer is None or trainer.is_global_zero:
        log.info(
            "predicting %d case(s) with %s into %s",
            len(cases), printable(cfg.ckpt_path), printable(Path(cfg.output_dir).resolve()),
        )
    if trainer is None:
        return run_cases(task, cases, predictor, device, cfg.overwrite, progress=cfg.progress)
    from lorkd.inference.case_runner_lightning import LightningCaseRunner

    runner = LightningCaseRunner(task, cases, predictor, cfg.overwrite, progress=cfg.progress)
    trainer.predict(runner, return_predictions=False)
    return runner.result

"""``python eval.py`` / ``lorkd-eval``: ``configs/eval.yaml`` parsed into the arguments of
:func:`lorkd.evaluation.pipeline.evaluate` (``lorkd.evaluate``), which runs the evaluation."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lorkd.utils import plain


def arguments(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`lorkd.evaluation.pipeline.evaluate` that ``cfg`` describes."""
    from hydra.utils import instantiate

    from lorkd.commands.predict import predictor_options

    callbacks = plain(cfg.get("callbacks")) or {}
    return {
        "model": cfg.ckpt_path,
        "manifest": cfg.data.test_manifest,
        "output_dir": cfg.paths.output_dir,
        "network": cfg.network,
        "name": cfg.get("name"),
        "compare": cfg.get("compare"),
        "overwrite": cfg.overwrite,
        "metrics": plain(cfg.metrics),
        "options": predictor_options(cfg),
        "official": plain(cfg.official),
        "region_map": instantiate(cfg.regions) if cfg.get("regions") else None,
        "trainer": plain(cfg.trainer),
        "callbacks": callbacks,
        # the plain loop's bars: asked for by the progress_bar callback, unless the trainer turns bars off
        "progress": "progress_bar" in callbacks and bool(cfg.trainer.get("enable_progress_bar", True)),
    }


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Evaluate as ``cfg`` says; the summary on rank 0, None elsewhere (see ``evaluate``)."""
    from lorkd.evaluation.pipeline import evaluate

    return evaluate(**arguments(cfg))

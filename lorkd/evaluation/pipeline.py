"""``python eval.py``: evaluate a checkpoint on a test manifest, then report.

    python eval.py ckpt_path=CKPT data.test_manifest=M output_dir=OUT [model=teacher] [compare=OTHER_OUT]

Steps (one process runs them without Lightning; with several, every rank runs them through
``Trainer.predict``: Lightning or torchrun/SLURM starts the ranks):

1. read the manifest, keeping going past bad lines (reported as failed cases);
2. load the Predictor and check everything else that can fail before any case runs;
3. run the cases with the one case runner (:mod:`lorkd.inference.runner`) and
   :class:`~lorkd.evaluation.task.EvaluationTask`: rank 0 keeps the records already in ``OUT/cases/``
   made with the same fingerprint (resume), the other cases are evaluated (each on exactly one rank),
   each record is stored when its case is done, and rank 0 writes the reports.

:func:`compare_demo` evaluates the demo teacher and the demo experts and prints their comparison.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lorkd.data.manifest import ManifestError, read_manifest
from lorkd.evaluation.outputs import comparison_names, load_summary
from lorkd.evaluation.records import records_folder
from lorkd.evaluation.report import render_comparison
from lorkd.evaluation.settings import MetricSettings, run_fingerprint
from lorkd.exit_codes import NotStarted
from lorkd.io import check_writable_folder
from lorkd.utils import PROJECT_ROOT, freeze_startup_objects, instantiate_group, plain

log = logging.getLogger(__name__)

MODELS = ("experts", "teacher")
DEMO_DIR = PROJECT_ROOT / "outputs" / "demo"
_PROBLEM = re.compile(r"^(?P<file>.*):(?P<line>\d+): (?P<message>.*)$", re.S)


def manifest_problems(manifest: Path, problems: Sequence[str]) -> list[dict[str, str]]:
    """Manifest problems as failed-case entries, named by the line's dataset and id where readable."""
    lines = manifest.read_text(encoding="utf-8").splitlines() if manifest.is_file() else []
    entries = []
    for problem in problems:
        dataset, case = "", ""
        match = _PROBLEM.match(problem)
        if match and 0 < int(match["line"]) <= len(lines):
            case = f"line {match['line']}"
            try:
                row = json.loads(lines[int(match["line"]) - 1])
                dataset, case = str(row.get("dataset", "")), str(row.get("id") or row.get("image") or case)
            except (ValueError, AttributeError):
                pass
        entries.append({"dataset": dataset, "case": case, "error": problem})
    return entries


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the evaluation described by ``configs/eval.yaml``; the summary on rank 0, None elsewhere.

    Raises :class:`~lorkd.exit_codes.NotStarted` (one line) when the run cannot start.
    """
    from lorkd.inference.runner import run_cases

    try:
        device = _single_device(cfg)
        task, cases, predictor = _prepare(cfg)
        trainer = None if device is not None else _trainer(cfg)
    except Exception as exc:  # bad config, manifest, checkpoint or output folder: nothing ran
        log.debug("the run could not start", exc_info=True)
        raise NotStarted(str(exc)) from exc
    freeze_startup_objects()
    if trainer is None:
        run_cases(task, cases, predictor, device, cfg.overwrite, progress=_progress_bar(cfg))
        return load_summary(cfg.paths.output_dir)
    from lorkd.inference.lightning_runner import CaseRunner

    trainer.predict(CaseRunner(task, cases, predictor, overwrite=cfg.overwrite), return_predictions=False)
    return load_summary(cfg.paths.output_dir) if trainer.is_global_zero else None


def _progress_bar(cfg: DictConfig) -> bool:
    """Whether the config asks for a progress bar (``callbacks.progress_bar``, ``trainer.enable_progress_bar``)."""
    callbacks = cfg.get("callbacks") or {}
    return "progress_bar" in callbacks and bool(cfg.trainer.get("enable_progress_bar", True))


def _single_device(cfg: DictConfig) -> Any:
    """The device of a one-process run (:func:`~lorkd.inference.runner.single_device`) whose only
    callback is the progress bar (the plain loop shows its own), else None (``Trainer.predict``)."""
    from lorkd.inference.runner import single_device

    if set(cfg.get("callbacks") or {}) - {"progress_bar"}:
        return None
    return single_device(plain(cfg.trainer))


def _trainer(cfg: DictConfig) -> Any:
    from lorkd.inference.lightning_runner import make_trainer

    callbacks = instantiate_group(cfg.get("callbacks"))
    return make_trainer(cfg.trainer, callbacks=callbacks, logger=False, use_distributed_sampler=False)


def _prepare(cfg: DictConfig) -> tuple[Any, list[Any], Any]:
    """The task, cases and predictor, after every check that can fail before any case runs."""
    from hydra.utils import instantiate

    from lorkd.api import load
    from lorkd.evaluation.task import EvaluationTask, model_info
    from lorkd.inference.predictor import NEUTRAL_OPTIONS

    out = check_writable_folder(cfg.paths.output_dir)
    records_folder(out)
    checkpoint = Path(cfg.ckpt_path)
    if not checkpoint.exists():
        raise FileNotFoundError(f"ckpt_path={checkpoint} does not exist")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {cfg.model!r}")
    if cfg.get("compare"):
        load_summary(cfg.compare)  # fail now, not after the whole evaluation
    settings = MetricSettings.coerce(plain(cfg.metrics))
    options = {**plain(cfg.inference), "fallback": plain(cfg.routing.fallback)}
    inference = {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS} | {"official": plain(cfg.official)}

    manifest = Path(cfg.data.test_manifest)
    cases, problems = read_manifest(manifest, require_masks=True)
    if not cases:
        raise ManifestError(manifest, problems)
    predictor = load(cfg.ckpt_path, cfg.model, device="cpu", **plain(cfg.official), **options)
    fingerprint = run_fingerprint(settings, predictor.model.identity, cfg.model, inference)  # the bytes loaded
    task = EvaluationTask(
        out,
        predictor,
        settings,
        fingerprint,
        model_info(predictor, checkpoint, fingerprint, cfg.get("name")),
        region_map=instantiate(cfg.regions) if cfg.get("regions") else None,
        problems=manifest_problems(manifest, problems),
        compare=cfg.get("compare"),
    )
    return task, cases, predictor


def _run_eval(overrides: Sequence[str]) -> None:
    command = [sys.executable, str(PROJECT_ROOT / "eval.py"), *overrides]
    print(f"\n$ {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=PROJECT_ROOT, check=True)


def compare_demo(demo_dir: str | Path = DEMO_DIR, overrides: Sequence[str] = ()) -> str:
    """Evaluate the demo teacher and the demo experts on the demo test set and print the comparison.

    Reads ``<demo_dir>/lorkd/checkpoints/last.ckpt`` and ``<demo_dir>/data/test.jsonl``; writes
    ``<demo_dir>/eval/teacher/`` and ``<demo_dir>/eval/lorkd/`` (whose report holds the side-by-side
    table). The teacher is the one the experts were distilled from (``model=teacher`` on the LoRKD
    checkpoint). Finished cases are not recomputed while the checkpoint is unchanged. ``overrides``
    go to both ``eval.py`` runs. Returns the printed text.
    """
    demo = Path(demo_dir)
    checkpoint = demo / "lorkd" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: train the demo first (make demo)")
    teacher_dir, lorkd_dir = demo / "eval" / "teacher", demo / "eval" / "lorkd"
    common = [f"ckpt_path={checkpoint}", f"data.test_manifest={demo / 'data' / 'test.jsonl'}", *overrides]
    start = time.perf_counter()
    _run_eval([*common, "model=teacher", f"output_dir={teacher_dir}"])
    _run_eval([*common, "model=experts", f"output_dir={lorkd_dir}", f"compare={teacher_dir}"])
    mine, theirs = load_summary(lorkd_dir), load_summary(teacher_dir)
    names = comparison_names(mine, theirs, teacher_dir)
    params = {
        name: s["model"]["parameter_count"]
        for name, s in zip(names, (mine, theirs))
        if s.get("model", {}).get("parameter_count") is not None
    }
    failed = mine["n_failed_cases"] + theirs["n_failed_cases"]
    text = "\n".join(
        [
            render_comparison(mine, theirs, names, params),
            f"{mine['n_cases']} test cases; evaluation took {time.perf_counter() - start:.0f} s"
            + (f"; {failed} failed case(s), see the reports" if failed else "")
            + f". Reports: {lorkd_dir / 'report.md'}, {teacher_dir / 'report.md'}",
        ]
    )
    print(text)
    return text

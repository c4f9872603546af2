"""``lorkd.evaluate`` (:func:`evaluate`; ``python eval.py`` parses its config into it, see
:mod:`lorkd.commands.evaluate`): evaluate a checkpoint on a test manifest, then report.

    python eval.py ckpt_path=CKPT data.test_manifest=M output_dir=OUT [network=teacher] [compare=OTHER_OUT]

Steps (one process runs them without Lightning; with several, every rank runs them through
``Trainer.predict``: Lightning or torchrun/SLURM starts the ranks):

1. read the manifest, keeping going past bad lines (reported as failed cases);
2. load the Predictor and check everything else that can fail before any case runs;
3. run the cases with the one case runner (:mod:`lorkd.inference.case_runner`) and
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorkd.data.manifest import ManifestError, read_manifest
from lorkd.evaluation.outputs import comparison_names, load_summary
from lorkd.evaluation.records import records_folder
from lorkd.evaluation.report import render_comparison
from lorkd.evaluation.settings import MetricSettings, run_fingerprint
from lorkd.exit_codes import NotStarted
from lorkd.io import check_writable_folder
from lorkd.utils import PROJECT_ROOT, freeze_startup_objects

if TYPE_CHECKING:
    from lorkd.regions import RegionMap

log = logging.getLogger(__name__)

MODELS = ("experts", "teacher")
TRAINER = "lightning.pytorch.trainer.Trainer"
OFFICIAL = {"text_checkpoint": None, "language_model_path": None, "net_overrides": {}}  # eval.yaml's official:
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


def evaluate(
    model: str | Path,
    manifest: str | Path,
    output_dir: str | Path,
    *,
    network: str = "experts",
    name: str | None = None,
    compare: str | Path | None = None,
    overwrite: bool = False,
    metrics: MetricSettings | Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    official: Mapping[str, Any] | None = None,
    region_map: RegionMap | None = None,
    trainer: Mapping[str, Any] | None = None,
    callbacks: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Evaluate ``model`` on the cases of ``manifest`` (with masks) into ``output_dir``; returns the summary
    (``summary.json``'s content) on rank 0, None on the other ranks. ``lorkd.evaluate``; ``eval.py`` calls it.

    Args:
        model: our LoRKD or SAT checkpoint, or an official SAT file.
        manifest: the test manifest (jsonl with masks; a bad line is reported as a failed case).
        output_dir: ``per_case.csv``, ``summary.json``, ``report.md``, ``dice_by_region.png``, ``cases/``.
        network: ``"experts"`` or ``"teacher"``.
        name: the model's name in reports (default: lorkd / teacher).
        compare: another evaluation's output folder: adds a per-region side-by-side table.
        overwrite: recompute cases already recorded in ``output_dir`` (else they are kept: resume).
        metrics: :class:`~lorkd.evaluation.settings.MetricSettings` or its keys (``space``, ``empty_rule``,
            ``tolerance_mm``, ``tolerance_overrides``); None: the defaults.
        options: the Predictor's options (``window``, ``threshold``, ``fallback``, ...; see :func:`lorkd.api.load`).
        official: for official SAT files: ``text_checkpoint``, ``language_model_path``, ``net_overrides``.
        region_map: report groups for a model without a region map (official SAT files).
        trainer: a Lightning ``Trainer`` config (``devices``, ``num_nodes``, ``strategy``, ...; ``_target_``
            optional); one process (None, or one device) runs the cases in a plain loop without Lightning.
        callbacks: Lightning callback configs by name (Hydra ``_target_`` nodes); any but ``progress_bar``
            runs the cases through ``Trainer.predict``.
        progress: show progress bars (one process).

    Raises :class:`~lorkd.exit_codes.NotStarted` (one line) when the run cannot start.
    """
    from lorkd.inference.case_runner import run_cases

    trainer = {"_target_": TRAINER, **(trainer or {"devices": 1})}
    callbacks = dict(callbacks or {})
    try:
        device = None if set(callbacks) - {"progress_bar"} else _single_device(trainer)
        task, cases, predictor = _prepare(
            model, manifest, output_dir, network, name, compare, metrics, options, official, region_map
        )
        lightning = None if device is not None else _trainer(trainer, callbacks)
    except Exception as exc:  # bad arguments, manifest, checkpoint or output folder: nothing ran
        log.debug("the run could not start", exc_info=True)
        raise NotStarted(str(exc)) from exc
    freeze_startup_objects()
    if lightning is None:
        run_cases(task, cases, predictor, device, overwrite, progress=progress)
        return load_summary(output_dir)
    from lorkd.inference.case_runner_lightning import LightningCaseRunner

    lightning.predict(LightningCaseRunner(task, cases, predictor, overwrite=overwrite), return_predictions=False)
    return load_summary(output_dir) if lightning.is_global_zero else None


def _single_device(trainer: Mapping[str, Any]) -> Any:
    """The device of a one-process run (:func:`~lorkd.inference.case_runner.single_device`), else None."""
    from lorkd.inference.case_runner import single_device

    return single_device(trainer)


def _trainer(trainer: Mapping[str, Any], callbacks: Mapping[str, Any]) -> Any:
    from hydra.utils import instantiate

    from lorkd.inference.case_runner_lightning import make_trainer

    made = [instantiate(node) for node in callbacks.values() if isinstance(node, Mapping) and "_target_" in node]
    return make_trainer(dict(trainer), callbacks=made, logger=False, use_distributed_sampler=False)


def _prepare(
    model: str | Path,
    manifest: str | Path,
    output_dir: str | Path,
    network: str,
    name: str | None,
    compare: str | Path | None,
    metrics: MetricSettings | Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    official: Mapping[str, Any] | None,
    region_map: RegionMap | None,
) -> tuple[Any, list[Any], Any]:
    """The task, cases and predictor, after every check that can fail before any case runs."""
    from lorkd.evaluation.task import EvaluationTask, model_info
    from lorkd.inference.predictor import NEUTRAL_OPTIONS, Predictor

    out = check_writable_folder(output_dir)
    records_folder(out)
    checkpoint = Path(model)
    if not checkpoint.exists():
        raise FileNotFoundError(f"ckpt_path={checkpoint} does not exist")
    if network not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {network!r}")
    if compare:
        load_summary(compare)  # fail now, not after the whole evaluation
    settings = MetricSettings.coerce(metrics)
    options = dict(options or {})
    official = {**OFFICIAL, **(official or {})}
    inference = {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS} | {"official": official}

    manifest = Path(manifest)
    cases, problems = read_manifest(manifest, require_masks=True)
    if not cases:
        raise ManifestError(manifest, problems)
    predictor = Predictor.load(checkpoint, network, device="cpu", **official, **options)
    fingerprint = run_fingerprint(settings, predictor.model.identity, network, inference)  # the bytes loaded
    task = EvaluationTask(
        out,
        predictor,
        settings,
        fingerprint,
        model_info(predictor, checkpoint, fingerprint, name),
        region_map=region_map,
        problems=manifest_problems(manifest, problems),
        compare=compare,
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
    table). The teacher is the one the experts were distilled from (``network=teacher`` on the LoRKD
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
    _run_eval([*common, "network=teacher", f"output_dir={teacher_dir}"])
    _run_eval([*common, "network=experts", f"output_dir={lorkd_dir}", f"compare={teacher_dir}"])
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

"""``python eval.py``: evaluate a checkpoint on a test manifest through ``Trainer.predict``, then report.

    python eval.py ckpt_path=CKPT data.test_manifest=M output_dir=OUT [model=teacher] [compare=OTHER_OUT]

Steps (every rank runs them; Lightning or torchrun/SLURM starts the ranks):

1. read the manifest, keeping going past bad lines (reported as failed cases);
2. keep the records already in ``OUT/cases/`` made with the same fingerprint (resume); rank 0 reads
   them before ``Trainer.predict`` (so before any rank writes a new one) and its list of finished
   cases decides for every rank;
3. ``Trainer.predict`` over the pending cases (one case per batch, each on exactly one rank) with
   :class:`~lorkd.evaluation.module.EvaluationModule`; the ``metrics_writer`` callback stores each
   record and writes the reports on rank 0 (see ``callbacks/metrics_writer.py``).

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

from omegaconf import DictConfig, OmegaConf

from lorkd.data.manifest import ManifestError, read_manifest
from lorkd.evaluation.outputs import comparison_names, load_summary
from lorkd.evaluation.records import input_digest, load_records, records_folder
from lorkd.evaluation.report import render_comparison
from lorkd.evaluation.settings import MetricSettings, run_fingerprint
from lorkd.exit_codes import NotStarted
from lorkd.io import check_writable_folder
from lorkd.utils import PROJECT_ROOT, instantiate_group, single_log_stream

log = logging.getLogger(__name__)

MODELS = ("experts", "teacher")
DEMO_DIR = PROJECT_ROOT / "outputs" / "demo"
_PROBLEM = re.compile(r"^(?P<file>.*):(?P<line>\d+): (?P<message>.*)$", re.S)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


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
    import lightning.pytorch  # noqa: F401  (its console handler, dropped next)

    single_log_stream()
    try:
        module, trainer = _prepare(cfg)
    except Exception as exc:  # bad config, manifest, checkpoint or output folder: nothing ran
        log.debug("the run could not start", exc_info=True)
        raise NotStarted(str(exc)) from exc
    trainer.predict(module, return_predictions=False)
    return load_summary(cfg.paths.output_dir) if trainer.is_global_zero else None


def _prepare(cfg: DictConfig) -> tuple[Any, Any]:
    """The evaluation module and trainer, after every check that can fail before any case runs."""
    from hydra.utils import instantiate

    from lorkd.evaluation.module import EvaluationModule
    from lorkd.inference.predictor import NEUTRAL_OPTIONS, Predictor

    out = check_writable_folder(cfg.paths.output_dir)
    records_folder(out)
    checkpoint = Path(cfg.ckpt_path)
    if not checkpoint.exists():
        raise FileNotFoundError(f"ckpt_path={checkpoint} does not exist")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {cfg.model!r}")
    if cfg.get("compare"):
        load_summary(cfg.compare)  # fail now, not after the whole evaluation
    settings = MetricSettings.coerce(_plain(cfg.metrics))
    options = _plain(cfg.inference)
    official = _plain(cfg.official)
    identity = {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS} | {"official": official}
    fingerprint = run_fingerprint(settings, checkpoint, cfg.model, identity)

    manifest = Path(cfg.data.test_manifest)
    cases, problems = read_manifest(manifest, require_masks=True)
    if not cases:
        raise ManifestError(manifest, problems)
    inputs = {(c.dataset, c.id): input_digest(c) for c in cases}
    previous = {} if cfg.overwrite else load_records(out, fingerprint, inputs)
    predictor = Predictor.from_checkpoint(
        checkpoint,
        cfg.model,
        text_checkpoint=official["text_checkpoint"],
        language_model_path=official["language_model_path"],
        net_overrides=official["net_overrides"],
        device="cpu",
        **options,
    )
    module = EvaluationModule(
        checkpoint,
        cases,
        settings,
        fingerprint,
        predictor,
        model=cfg.model,
        name=cfg.get("name"),
        region_map=instantiate(cfg.regions) if cfg.get("regions") else None,
        previous=previous,
        problems=manifest_problems(manifest, problems),
    )
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not any(type(c).__name__ == "MetricsWriter" for c in callbacks):
        raise ValueError(
            "configs/eval.yaml needs the callbacks.metrics_writer callback (it writes the results)"
        )
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, use_distributed_sampler=False)
    return module, trainer


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

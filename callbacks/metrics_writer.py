"""Prediction writer for evaluation: store each case's metric record, then report on rank 0.

Works with :class:`lorkd.evaluation.module.EvaluationModule`, whose ``predict_step`` returns a
:class:`~lorkd.evaluation.records.CaseRecord`:

* every batch (one case): the rank that evaluated it writes ``OUT/cases/<case>.json`` atomically,
  so an interrupted run resumes from there;
* at the end (``teardown``, which Lightning calls on every rank, also on a rank that had no case):
  records are gathered on rank 0 with ``torch.distributed.all_gather_object`` (ragged per-rank lists;
  ``LightningModule.all_gather`` aborts under gloo with uneven lengths), merged with the records kept
  from an earlier run, de-duplicated by case and written as ``per_case.csv``, ``summary.json``,
  ``report.md`` and ``dice_by_region.png``. All ranks then wait at a barrier, so every rank returns
  only once the reports exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from lorkd.evaluation.outputs import write_outputs
from lorkd.evaluation.records import CaseRecord, save_record
from lorkd.utils import gather_objects

log = logging.getLogger(__name__)


def _number(value: Any) -> float:
    """A summary value for ``%.4f`` (None, when no case succeeded, prints as nan)."""
    return float("nan") if value is None else float(value)


def unique_records(records: list[CaseRecord]) -> list[CaseRecord]:
    """One record per (dataset, case), the first one kept."""
    seen: dict[tuple[str, str], CaseRecord] = {}
    for record in records:
        seen.setdefault(record.key, record)
    return list(seen.values())


class MetricsWriter(BasePredictionWriter):
    """Store case records in ``output_dir``; write the reports there (``compare``: another output dir)."""

    def __init__(self, output_dir: str | Path, compare: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.compare = Path(compare) if compare else None
        self.records: list[CaseRecord] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.records = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, CaseRecord):
            raise TypeError(f"MetricsWriter expects CaseRecord predictions, got {type(prediction).__name__}")
        save_record(self.output_dir, prediction)
        self.records.append(prediction)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        records = gather_objects(self.records)
        if trainer.is_global_zero:
            merged = unique_records([*pl_module.previous, *records])
            summary = write_outputs(
                self.output_dir,
                merged,
                pl_module.settings,
                pl_module.model_info,
                pl_module.problems,
                self.compare,
            )
            overall = summary["overall"]
            log.info(
                "evaluated %d case(s) (%d now, %d kept from an earlier run, %d failed): Dice %.4f, NSD %.4f -> %s",
                summary["n_cases"], len(records), len(pl_module.previous), summary["n_failed_cases"],
                _number(overall["dice"]), _number(overall["nsd"]), self.output_dir,
            )  # fmt: skip
        trainer.strategy.barrier("metrics_writer")

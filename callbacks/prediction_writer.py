"""Write each predicted case as soon as it is done, and ``summary.csv`` once all ranks are done.

Every rank writes its own cases (Lightning's predict sampler gives each case to one rank). At the
end, the per-case summary rows of all ranks are gathered with ``torch.distributed.all_gather_object``
(ragged lists are fine, unlike ``LightningModule.all_gather`` under gloo) and rank 0 writes
``<output_dir>/summary.csv`` in input order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from lorkd.inference.module import CaseOutcome, case_error
from lorkd.inference.writer import save_prediction, write_summary
from lorkd.utils import gather_objects

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Save every :class:`~lorkd.inference.module.CaseOutcome` and the run's ``summary.csv``.

    ``summary`` (rows in input order) is available on every rank after ``Trainer.predict``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        preview: bool = True,
        save_probabilities: bool = False,
        statistics: bool = False,
        format: str = "nifti",
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.preview = bool(preview)
        self.save_probabilities = bool(save_probabilities)
        self.statistics = bool(statistics)
        self.format = format  # "dicom_seg": also segmentation.dcm for DICOM series inputs
        self._rows: list[tuple[int, dict[str, Any]]] = []
        self.summary: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []
        self.summary = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: CaseOutcome,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        outcome = prediction
        if outcome.status == "ok":
            try:
                marker = save_prediction(
                    outcome.prediction,
                    outcome.folder,
                    case=outcome.folder.name,
                    preview=self.preview,
                    probabilities=self.save_probabilities,
                    metadata=outcome.metadata,
                    root=self.output_dir,
                    statistics=self.statistics,
                    dicom_source=Path(outcome.case.image) if self.format == "dicom_seg" else None,
                )
                outcome.rows = marker["rows"]
            except Exception as exc:  # a link planted in the folder, a full disk: this case fails, not the run
                outcome.status = "error"
                outcome.rows = [{"case": outcome.folder.name, "status": "error", "error": case_error(outcome.case, exc)}]
            outcome.prediction = None  # free the volumes now
        if outcome.status == "error":
            log.error("case %s failed: %s", outcome.case.id, outcome.rows[0]["error"])
        self._rows.extend((outcome.index, row) for row in outcome.rows)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = sorted(gather_objects(self._rows), key=lambda pair: pair[0])
        self.summary = [row for _, row in rows]
        if trainer.is_global_zero:
            write_summary(self.output_dir / "summary.csv", self.summary)

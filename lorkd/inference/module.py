"""Prediction as a LightningModule, so ``Trainer.predict`` shards cases over devices and nodes.

Each batch is one case (:class:`~lorkd.data.datasets.CaseDataset`); ``predict_step`` returns a
:class:`CaseOutcome` that a prediction writer callback (``callbacks/prediction_writer.py``) saves.
A case is skipped unless ``overwrite`` when its folder holds a complete prediction made for the same
key: the case's identity (image path, size and mtime_ns, labels, modality, region, orientation) and
the run's (checkpoint identity, model, options that change masks, files written), with every listed
file present and loading. A case that fails (unreadable image, not 3-D, NaN, RGB, ...) becomes an
``error`` outcome naming its file and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lorkd.data.manifest import Case, case_identity
from lorkd.inference.predictor import Prediction, Predictor
from lorkd.inference.progress import CaseProgress
from lorkd.inference.writer import completed, safe_name


@dataclass
class CaseOutcome:
    """What happened to one case: ``status`` is ``ok`` (``prediction`` set), ``skipped`` or ``error``."""

    index: int
    case: Case
    folder: Path
    status: str
    prediction: Prediction | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def case_error(case: Case, exc: Exception) -> str:
    """One line naming the case's image and the problem."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if str(case.image) in text else f"{case.image}: {type(exc).__name__}: {text}"


def case_folder(output_dir: str | Path, case: Case) -> Path:
    return Path(output_dir) / safe_name(case.id, "case")


class PredictionModule(pl.LightningModule):
    def __init__(
        self,
        predictor: Predictor,
        output_dir: str | Path,
        overwrite: bool = False,
        save_probabilities: bool = False,
        progress: bool = True,
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.predictor = predictor  # a plain attribute: moved in on_predict_start, never DDP-wrapped
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.save_probabilities = bool(save_probabilities)
        self.show_progress = bool(progress)
        self.settings = dict(settings or {})  # the run's part of each case's resume key
        self.progress = CaseProgress(0, enabled=False)

    @property
    def source(self) -> str:
        """The checkpoint's absolute path (recorded in each case's marker)."""
        return str(Path(self.predictor.model.source).resolve())

    def on_predict_start(self) -> None:
        self.predictor.to(self.device)
        total = int(sum(self.trainer.num_predict_batches))
        self.progress = CaseProgress(total, enabled=self.show_progress and self.trainer.is_global_zero)
        self.progress.start()

    def on_predict_end(self) -> None:
        self.progress.stop()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> CaseOutcome:
        case: Case = batch["case"]
        folder = case_folder(self.output_dir, case)
        key = {"case": case_identity(case), "run": self.settings}
        meta = {"image": str(case.image), "checkpoint": self.source, "rank": self.global_rank, "key": key}
        outcome = CaseOutcome(int(batch["index"]), case, folder, "ok", metadata=meta)
        marker = None if self.overwrite else completed(folder, case.labels, key)
        if marker is not None:
            outcome.status = "skipped"
            outcome.rows = [{**row, "status": "skipped"} for row in marker.get("rows", [])]
            self.progress.advance()
            return outcome
        try:
            outcome.prediction = self.predictor.predict(
                case.image,
                case.labels,
                case.modality,
                region=case.region,
                orientation=case.orientation,
                return_probabilities=self.save_probabilities,
                progress=self.progress.case(case.id),
            )
        except Exception as exc:  # any failure of one case (CaseError names the file) must not stop the others
            outcome.status = "error"
            outcome.rows = [{"case": folder.name, "status": "error", "error": case_error(case, exc)}]
        self.progress.advance()
        return outcome

"""``ModelCheckpoint`` whose ``last.ckpt`` (the resume point) is always the run's latest state, and which
stops a run that was asked to stop (SIGTERM) at a step boundary once ``last.ckpt`` holds that step."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lorkd.exit_codes import STOPPED
from lorkd.io import remove_temporaries

log = logging.getLogger(__name__)


class ResumeCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` written at every ``every_n_train_steps``.

    Lightning defers a step-triggered save until the next validation while the monitored metric
    (``val/dice``) does not exist yet or is about to be refreshed, so with ``every_n_train_steps``
    below ``val_check_interval`` a run killed before its first validation had no resume point. Here
    ``last.ckpt`` is written at the step itself (``save_last=True``; ``"link"`` keeps Lightning's
    behaviour); the best-by-metric checkpoint still waits for the validation, which then writes
    ``last.ckpt`` once more with the validation done.

    ``last.ckpt`` is always the latest state: it is never versioned (Lightning writes ``last-v1.ckpt``
    beside an existing ``last.ckpt`` that a resumed run with other settings does not recognise), it
    is written when training ends, and when SIGTERM arrives (any rank's) every rank stops after the
    step in progress, ``last.ckpt`` holds that step, and :class:`SIGTERMException` carries exit code
    :data:`~lorkd.exit_codes.STOPPED`. Temporary files of a write that a kill interrupted
    (``.tmp-*``, :func:`lorkd.io.atomic_write`) are removed from the checkpoint folder when fitting starts.
    """

    _last_step_written: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            for path in remove_temporaries(self.dirpath):
                log.info("removed %s, the temporary file of a checkpoint write that was interrupted", path)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        deferred_before = self._defer_save_until_validation
        self._defer_save_until_validation = False
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        deferred_now = self._defer_save_until_validation
        self._defer_save_until_validation = deferred_before or deferred_now
        if deferred_now and self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            step_saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = step_saved  # so that the validation at this step still saves
        # every rank takes the same decision at the same step (ranks may receive SIGTERM steps apart)
        if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self._save_latest(trainer)
            raise SIGTERMException(STOPPED)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_latest(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM raised by Lightning itself (during validation, in a single process): save ``last.ckpt`` too."""
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and trainer.world_size == 1:
            self._save_latest(trainer)

    def _save_latest(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this step."""
        if self.save_last and not trainer.fast_dev_run and self._last_step_written != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        versioned, self._enable_version_counter = self._enable_version_counter, False  # always last.ckpt
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = versioned
        if self.save_last:
            self._last_step_written = trainer.global_step

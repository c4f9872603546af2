"""``ModelCheckpoint`` whose ``last.ckpt`` (the resume point) never waits for a validation metric."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumeCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` written at every ``every_n_train_steps``.

    Lightning defers a step-triggered save until the next validation while the monitored metric
    (``val/dice``) does not exist yet or is about to be refreshed, so with ``every_n_train_steps``
    below ``val_check_interval`` a run killed before its first validation had no resume point. Here
    ``last.ckpt`` is written at the step itself (``save_last=True``; ``"link"`` keeps Lightning's
    behaviour); the best-by-metric checkpoint still waits for the validation, which then writes
    ``last.ckpt`` once more with the validation done.
    """

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

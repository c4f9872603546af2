"""``ModelCheckpoint`` whose ``last.ckpt`` (the resume point) is always the run's latest state, and which
stops a run that was asked to stop (SIGTERM, SLURM's requeue signal) at a step boundary once ``last.ckpt``
holds that step."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from lorkd.exit_codes import Stopped
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
    is written when training ends, and when SIGTERM arrives (on any rank) every rank stops after the
    training step in progress, ``last.ckpt`` holds that step, and :class:`~lorkd.exit_codes.Stopped`
    ends the fit (exit code :data:`~lorkd.exit_codes.STOPPED`). Under SLURM with auto-requeue (Lightning's default) the
    requeue signal (``--signal=SIGUSR1@120``) stops the run the same way, then rank 0 requeues the job
    (``scontrol requeue``). These handlers replace Lightning's, which save or broadcast inside the signal
    handler itself and so can deadlock DDP ranks; here the handler only takes note, and the ranks agree
    at the end of each training step (one all-reduce of a flag). Temporary files of a write that a kill
    interrupted (``.tmp-*``, :func:`lorkd.io.atomic_write`) are removed from the checkpoint folder when
    fitting starts.
    """

    _last_step_written: int | None = None
    _stop: str | None = None  # the name of the signal that asked to stop
    _requeue_signal: str | None = None  # SLURM's (SIGUSR1), when it asks for a requeue

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
        # every rank takes the same decision at the same step (ranks may receive the signal steps apart)
        if trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False):
            self._save_latest(trainer)
            requeue = trainer.strategy.reduce_boolean_decision(self._stop == self._requeue_signal, all=False)
            if requeue and trainer.is_global_zero:
                _requeue()
            raise Stopped(self._stop or "SIGTERM")  # another rank's SIGTERM

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over SIGTERM (and SLURM's requeue signal) from Lightning, which registered its handlers
        for this fit already and restores the ones from before when the fit ends."""
        self._stop = "SIGTERM" if trainer.received_sigterm else None  # one that came before (Lightning's handler)
        self._requeue_signal = None
        if threading.current_thread() is not threading.main_thread():
            return
        launcher = trainer.strategy.launcher

        def request(signum: int, frame: FrameType | None) -> None:
            if self._stop is None and launcher is not None:
                launcher.kill(signum)  # the processes this one launched (Lightning's launcher) stop too
            self._stop = self._stop or signal.Signals(signum).name

        signal.signal(signal.SIGTERM, request)
        environment = trainer._accelerator_connector.cluster_environment  # as Lightning's signal connector reads it
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
            self._requeue_signal = signal.Signals(environment.requeue_signal).name
            signal.signal(environment.requeue_signal, request)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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


def _requeue() -> None:
    """``scontrol requeue`` this SLURM job (or array task), as Lightning's auto-requeue does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("could not requeue SLURM job %s: scontrol is not on PATH", job)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s; it resumes from last.ckpt", job)
    else:
        log.warning("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())

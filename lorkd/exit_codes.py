"""Exit codes of the batch commands (``predict.py``, ``eval.py``, ``lorkd-predict``, ``lorkd-eval``).

* 0 (:data:`OK`): every case done (predicted, evaluated, or already complete);
* 1 (:data:`CASES_FAILED`): some case failed; the others were done and the summary written;
* 2 (:data:`NOT_STARTED`): the run could not start (bad config or input, unreadable checkpoint,
  unwritable output folder): raised as :class:`NotStarted` before any case runs.

``train.py`` (``lorkd-train``) exits 0 when training finished and 143 (:data:`STOPPED`, 128 + SIGTERM, what
schedulers read as "terminated") when it was stopped by SIGTERM (or SLURM's requeue signal) after saving
``last.ckpt`` at the step it reached.
"""

from __future__ import annotations

OK, CASES_FAILED, NOT_STARTED = 0, 1, 2
STOPPED = 143


class NotStarted(Exception):
    """A run that could not start; the message is what the user sees (no traceback)."""


class Stopped(SystemExit):
    """Training that a signal (``signal_name``) stopped once ``last.ckpt`` held its step: exits :data:`STOPPED`."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(STOPPED)
        self.signal_name = signal_name


def for_failures(failed: int) -> int:
    """The exit code of a run that finished with ``failed`` failed cases."""
    return CASES_FAILED if failed else OK

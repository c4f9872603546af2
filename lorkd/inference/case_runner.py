"""The one case runner of ``predict.py`` and ``eval.py``: a plain loop in one process, ``Trainer.predict`` over several.

A case goes along one path, whatever the task (:class:`~lorkd.inference.prediction_task.PredictionTask`,
:class:`~lorkd.evaluation.task.EvaluationTask`) and however many processes run it
(:class:`CaseLoop` holds the steps; :func:`run_cases` drives them in this process without Lightning,
:class:`~lorkd.inference.case_runner_lightning.LightningCaseRunner` through ``Trainer.predict`` on every rank):

1. **skip or run**: unless ``overwrite``, rank 0 asks the task which cases an earlier run finished
   (:meth:`CaseTask.finished`) before any rank writes, and broadcasts the answer, so every rank
   derives the same pending list even when ranks see different files;
2. **run**: the pending cases are sharded ``rank, rank + world, ...`` (:class:`ShardSampler`; a rank
   may get none, which Lightning's own predict sampler refuses); each is run holding its lock
   (:meth:`CaseTask.lock_file`), so another run writing into the same folder never writes or cleans the
   same case at the same time, and a case that run completed meanwhile (:meth:`CaseTask.completed`) is
   kept, not redone; :meth:`CaseTask.run` turns a case into an outcome and never raises (a failed case
   is an outcome naming its file);
3. **files of the case**: :meth:`CaseTask.save` writes them on the rank that ran it, at once;
4. **files of the run**: at the end (on every rank, also on one without a case) the outcomes of all
   ranks are gathered, rank 0 merges them with the kept ones in input order and :meth:`CaseTask.finish`
   writes the run's files; every rank then gets the result and returns only once those files exist.

:func:`single_device` tells from a ``trainer`` config, without importing Lightning, whether a run is one
process (and on which device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch.utils.data import Sampler

from lorkd.data.manifest import Case
from lorkd.inference.progress import CaseProgress
from lorkd.io import FileLock, printable
from lorkd.utils import gather_objects

log = logging.getLogger(__name__)

Outcome = TypeVar("Outcome")
WindowProgress = Callable[[int, int], None] | None
Broadcast = Callable[[Any], Any]  # rank 0's object on every rank


class CaseTask(Protocol[Outcome]):
    """What a run does with each case; the runner decides when (see the module docstring)."""

    def finished(self, cases: Sequence[Case]) -> Mapping[int, Outcome]:
        """Rank 0, before any case runs: the outcomes an earlier run left, by case index (not run again)."""

    def lock_file(self, case: Case) -> Path:
        """The file whose lock guards the case's files from another run writing into the same folder."""

    def completed(self, case: Case) -> Outcome | None:
        """The outcome another run left for ``case`` (checked with the case's lock held), else None."""

    def run(self, index: int, case: Case, rank: int, progress: WindowProgress) -> Outcome:
        """The outcome of one case (a failure is an outcome too: this never raises)."""

    def save(self, outcome: Outcome) -> Outcome:
        """Write the case's files; returns the outcome to gather (large arrays dropped)."""

    def finish(self, outcomes: Sequence[Outcome], kept: int) -> Any:
        """Rank 0, after every case: write the run's files from all outcomes (input order, ``kept`` of
        them left by an earlier run); returns the run's result."""


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``n`` items: no item twice, possibly none for a rank."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _same(value: Any) -> Any:
    """The broadcast of a single process."""
    return value


class CaseLoop(Generic[Outcome]):
    """The steps of the module docstring for ``cases`` with ``task`` on one rank.

    ``overwrite``: run every case again, keeping nothing of an earlier run. ``progress``: rich bars
    over cases and the current case's windows on rank 0.
    """

    def __init__(self, task: CaseTask[Outcome], cases: Sequence[Case], overwrite: bool = False, progress: bool = False) -> None:
        self.task = task
        self.cases = list(cases)
        self.overwrite = bool(overwrite)
        self.show_progress = bool(progress)
        self.pending: list[int] = []
        self.kept: dict[int, Outcome] = {}
        self.outcomes: list[tuple[int, Outcome]] = []
        self.result: Any = None
        self.progress = CaseProgress(0, enabled=False)

    def plan(self, rank: int, world: int, broadcast: Broadcast = _same) -> None:
        """Step 1: the cases an earlier run finished (kept) and the pending ones, the same on every rank."""
        found = {} if self.overwrite or rank != 0 else dict(self.task.finished(self.cases))
        done = set(broadcast(sorted(found)))
        self.kept = found
        self.pending = [i for i in range(len(self.cases)) if i not in done]
        self.outcomes = []
        if rank == 0:
            log.info(
                "%d case(s): %d done by an earlier run, %d to run on %d process(es)",
                len(self.cases), len(done), len(self.pending), world,
            )  # fmt: skip

    def start(self, total: int, rank: int) -> None:
        """Show the bars (rank 0, when asked) over the ``total`` cases this rank runs."""
        self.progress = CaseProgress(total, enabled=self.show_progress and rank == 0)
        self.progress.start()

    def step(self, index: int, rank: int, wait: bool = True) -> Outcome | None:
        """Steps 2 and 3 for case ``index``, holding its lock: run it and write its files, unless another
        run completed it meanwhile (its outcome is kept). Another run holding the lock: wait for it, or
        return None at once with ``wait=False``."""
        case = self.cases[index]
        lock = FileLock(self.task.lock_file(case))
        if not lock.acquire(wait=False):
            if not wait:
                return None
            log.info("case %s is being written by another run (%s); waiting for it", printable(case.id), lock.holder())
            lock.acquire()
        try:
            outcome = None if self.overwrite else self.task.completed(case)
            if outcome is None:
                outcome = self.task.save(self.task.run(index, case, rank, self.progress.case(case.id)))
            else:
                log.info("case %s was completed by another run meanwhile; kept", printable(case.id))
        finally:
            lock.release()
        self.outcomes.append((index, outcome))
        self.progress.advance()
        return outcome

    def finish(self, rank: int, broadcast: Broadcast = _same) -> Any:
        """Step 4: gather every rank's outcomes, rank 0 writes the run's files; the result on every rank."""
        self.progress.stop()
        gathered = gather_objects(self.outcomes)
        result = None
        if rank == 0:
            merged = sorted([*self.kept.items(), *gathered], key=lambda pair: pair[0])
            result = self.task.finish([outcome for _, outcome in merged], len(self.kept))
        self.result = broadcast(result)
        return self.result


def run_cases(
    task: CaseTask[Outcome],
    cases: Sequence[Case],
    predictor: Any,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> Any:
    """Every case in this process, in input order, with ``predictor`` moved to ``device``; the run's result.

    A case another run is writing (same output folder) is put off to the end, then waited for."""
    loop = CaseLoop(task, cases, overwrite, progress)
    loop.plan(0, 1)
    predictor.to(torch.device(device))
    loop.start(len(loop.pending), 0)
    try:
        busy = [index for index in loop.pending if loop.step(index, 0, wait=False) is None]
        for index in busy:
            loop.step(index, 0)
    finally:
        loop.progress.stop()
    return loop.finish(0)


def _one(value: Any) -> bool:
    return value in (1, "1") or (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1)


def single_device(trainer: Mapping[str, Any]) -> torch.device | None:
    """The device of a run that ``trainer`` (a ``Trainer`` config) makes one process, None for more.

    One process: ``devices`` 1 (or one device index, or ``auto`` on the CPU), ``num_nodes`` 1, full
    precision, and no launcher (torchrun, SLURM) that started several ranks. Accelerators ``cpu``,
    ``gpu``/``cuda``, ``mps`` and ``auto`` (as Lightning resolves it: CUDA, else MPS, else the CPU).
    """
    accelerator = str(trainer.get("accelerator", "auto") or "auto")
    devices = trainer.get("devices", "auto")
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={trainer.get('accelerator')}: CUDA is not available on this machine")
    if accelerator not in ("cpu", "cuda", "mps") or int(trainer.get("num_nodes", 1) or 1) != 1:
        return None
    if str(trainer.get("precision", "32-true")) not in ("32", "32-true") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if not (_one(devices) or (devices == "auto" and accelerator == "cpu")):
        return None
    if accelerator == "cuda":
        index = devices[0] if isinstance(devices, Sequence) and not isinstance(devices, str) else 0
        return torch.device("cuda", int(index))
    return torch.device(accelerator)

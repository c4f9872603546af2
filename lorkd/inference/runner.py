"""The one case runner of ``predict.py`` and ``eval.py``: ``Trainer.predict`` over cases, one case a batch.

A case goes along one path, whatever the task (:class:`~lorkd.inference.cases.PredictionTask`,
:class:`~lorkd.evaluation.task.EvaluationTask`):

1. **skip or run** (decided here only): unless ``overwrite``, rank 0 asks the task which cases an
   earlier run finished (:meth:`CaseTask.finished`) before any rank writes, and broadcasts the answer,
   so every rank derives the same pending list even when ranks see different files;
2. **run**: the pending cases are sharded ``rank, rank + world, ...`` (:class:`ShardSampler`; a rank
   may get none, which Lightning's own predict sampler refuses); :meth:`CaseTask.run` turns a case
   into an outcome and never raises (a failed case is an outcome naming its file);
3. **files of the case**: :meth:`CaseTask.save` writes them on the rank that ran it, at once;
4. **files of the run**: in ``teardown`` (which Lightning calls on every rank, also on one without a
   case) the outcomes of all ranks are gathered, rank 0 merges them with the kept ones in input order
   and :meth:`CaseTask.finish` writes the run's files; every rank then gets its result
   (:attr:`CaseRunner.result`) and returns only once those files exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Sampler

from lorkd.data.datasets import CaseDataset, collate_case
from lorkd.data.manifest import Case
from lorkd.inference.progress import CaseProgress
from lorkd.utils import gather_objects

log = logging.getLogger(__name__)

Outcome = TypeVar("Outcome")
WindowProgress = Callable[[int, int], None] | None


class CaseTask(Protocol[Outcome]):
    """What a run does with each case; the runner decides when (see the module docstring)."""

    def finished(self, cases: Sequence[Case]) -> Mapping[int, Outcome]:
        """Rank 0, before any case runs: the outcomes an earlier run left, by case index (not run again)."""

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


class CaseRunner(pl.LightningModule, Generic[Outcome]):
    """Runs ``cases`` with ``task`` (module docstring); ``predictor`` is moved to the rank's device.

    ``overwrite``: run every case again, keeping nothing of an earlier run. ``progress``: rich bars
    over cases and the current case's windows on rank 0.
    """

    def __init__(
        self,
        task: CaseTask[Outcome],
        cases: Sequence[Case],
        predictor: Any,
        overwrite: bool = False,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.task = task
        self.cases = list(cases)
        self.predictor = predictor  # a plain attribute: moved in setup, never DDP-wrapped
        self.overwrite = bool(overwrite)
        self.show_progress = bool(progress)
        self.pending: list[int] = []
        self.kept: dict[int, Outcome] = {}
        self.outcomes: list[tuple[int, Outcome]] = []
        self.result: Any = None
        self.progress = CaseProgress(0, enabled=False)

    def setup(self, stage: str) -> None:
        found = {} if self.overwrite or not self.trainer.is_global_zero else dict(self.task.finished(self.cases))
        done = set(self.trainer.strategy.broadcast(sorted(found), src=0))
        self.kept = found
        self.pending = [i for i in range(len(self.cases)) if i not in done]
        self.outcomes = []
        if self.trainer.is_global_zero:
            log.info(
                "%d case(s): %d done by an earlier run, %d to run on %d process(es)",
                len(self.cases), len(done), len(self.pending), self.trainer.world_size,
            )  # fmt: skip
        self.predictor.to(self.trainer.strategy.root_device)

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.pending), self.trainer.global_rank, self.trainer.world_size)
        pending = [self.cases[i] for i in self.pending]
        return DataLoader(CaseDataset(pending), batch_size=1, sampler=sampler, collate_fn=collate_case)

    def on_predict_start(self) -> None:
        total = int(sum(self.trainer.num_predict_batches))
        self.progress = CaseProgress(total, enabled=self.show_progress and self.trainer.is_global_zero)
        self.progress.start()

    def on_predict_end(self) -> None:
        self.progress.stop()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Outcome:
        index = self.pending[int(batch["index"])]
        case: Case = batch["case"]
        outcome = self.task.save(self.task.run(index, case, self.global_rank, self.progress.case(case.id)))
        self.outcomes.append((index, outcome))
        self.progress.advance()
        return outcome

    def teardown(self, stage: str) -> None:
        if stage != "predict":
            return
        gathered = gather_objects(self.outcomes)
        result = None
        if self.trainer.is_global_zero:
            merged = sorted([*self.kept.items(), *gathered], key=lambda pair: pair[0])
            result = self.task.finish([outcome for _, outcome in merged], len(self.kept))
        self.result = self.trainer.strategy.broadcast(result, src=0)

""":class:`LightningCaseRunner`: the steps of :class:`~lorkd.inference.case_runner.CaseLoop` on every rank of ``Trainer.predict``.

Used when a run has several processes (``trainer.devices``/``num_nodes`` above 1, torchrun, SLURM); one
process runs :func:`~lorkd.inference.case_runner.run_cases` instead, without Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lorkd.data.datasets import CaseDataset, collate_case
from lorkd.data.manifest import Case
from lorkd.inference.case_runner import CaseLoop, CaseTask, Outcome, ShardSampler
from lorkd.utils import single_log_stream


class LightningCaseRunner(pl.LightningModule, Generic[Outcome]):
    """Runs ``cases`` with ``task`` (see :mod:`lorkd.inference.case_runner`); ``predictor`` is moved to the
    rank's device; :attr:`result` is the run's result on every rank after ``Trainer.predict``."""

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
        self.loop = CaseLoop(task, cases, overwrite, progress)
        self.predictor = predictor  # a plain attribute: moved in setup, never DDP-wrapped

    @property
    def result(self) -> Any:
        return self.loop.result

    def _broadcast(self, value: Any) -> Any:
        return self.trainer.strategy.broadcast(value, src=0)

    def setup(self, stage: str) -> None:
        self.loop.plan(self.trainer.global_rank, self.trainer.world_size, self._broadcast)
        self.predictor.to(self.trainer.strategy.root_device)

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.loop.pending), self.trainer.global_rank, self.trainer.world_size)
        pending = [self.loop.cases[i] for i in self.loop.pending]
        return DataLoader(CaseDataset(pending), batch_size=1, sampler=sampler, collate_fn=collate_case)

    def on_predict_start(self) -> None:
        self.loop.start(int(sum(self.trainer.num_predict_batches)), self.trainer.global_rank)

    def on_predict_end(self) -> None:
        self.loop.progress.stop()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Outcome:
        return self.loop.step(self.loop.pending[int(batch["index"])], self.trainer.global_rank)

    def teardown(self, stage: str) -> None:
        if stage == "predict":
            self.loop.finish(self.trainer.global_rank, self._broadcast)


def make_trainer(config: Any, **kwargs: Any) -> pl.Trainer:
    """The ``Trainer`` of a ``trainer`` config (``kwargs`` added), Lightning's own console handler dropped."""
    from hydra.utils import instantiate

    single_log_stream()
    return instantiate(config, **kwargs)

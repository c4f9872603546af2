"""LightningModule that evaluates whole cases through ``Trainer.predict`` (one case per batch).

In ``setup`` (every rank, process group up) rank 0's list of finished cases is broadcast, so every
rank derives the same pending list even when ranks see different files (several nodes without a
shared output folder). Each rank moves the :class:`~lorkd.inference.predictor.Predictor` (loaded
before the run starts, so an unreadable checkpoint stops it at once) to its device and evaluates pending cases ``rank, rank + world, ...``, each exactly once. A rank may get no
case at all (a resumed run with few cases left, or more ranks than cases), which Lightning's own
predict sampler refuses; hence :class:`ShardSampler` and ``use_distributed_sampler=False``.
``predict_step`` returns a :class:`~lorkd.evaluation.records.CaseRecord`; a writer callback
(``callbacks/metrics_writer.py``) stores it, gathers the records on rank 0 and writes the reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Sampler

from lorkd.data.datasets import CaseDataset, collate_case
from lorkd.data.manifest import Case
from lorkd.evaluation.cases import evaluate_record
from lorkd.evaluation.records import CaseKey, CaseRecord
from lorkd.evaluation.settings import MetricSettings
from lorkd.inference.predictor import Predictor
from lorkd.regions import RegionMap

log = logging.getLogger(__name__)


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


class EvaluationModule(pl.LightningModule):
    """What is evaluated and how: the manifest's cases, the model, the metric settings.

    ``previous`` maps (dataset, case) to the records of an earlier run (resume); rank 0's keys decide
    which cases every rank skips. For the writer on rank 0 the module exposes :attr:`previous` (the
    kept records, after ``setup``), :attr:`problems` (manifest lines that could not be read) and
    :attr:`model_info`.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        cases: Sequence[Case],
        settings: MetricSettings,
        fingerprint: str,
        predictor: Predictor,
        model: str = "experts",
        name: str | None = None,
        region_map: RegionMap | None = None,
        previous: Mapping[CaseKey, CaseRecord] | None = None,
        problems: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.checkpoint = str(checkpoint)
        self.cases = list(cases)
        self.settings = settings
        self.fingerprint = fingerprint
        self.model_kind = model
        self.name = name
        self.fallback_region_map = region_map
        self.found = dict(previous or {})
        self.problems = [dict(p) for p in problems]
        self.pending: list[Case] = []
        self.previous: list[CaseRecord] = []
        self.predictor = predictor  # a plain attribute: moved in setup, never DDP-wrapped

    def setup(self, stage: str) -> None:
        done = {tuple(k) for k in self.trainer.strategy.broadcast(sorted(self.found), src=0)}
        keys = [(c.dataset, c.id) for c in self.cases]
        self.pending = [c for c, key in zip(self.cases, keys) if key not in done]
        self.previous = [self.found[k] for k in keys if k in done and k in self.found]
        if self.trainer.is_global_zero:
            log.info(
                "%d case(s): %d already evaluated, %d to evaluate on %d process(es); %d unreadable manifest line(s)",
                len(self.cases), len(self.previous), len(self.pending), self.trainer.world_size, len(self.problems),
            )  # fmt: skip
        self.predictor.to(self.trainer.strategy.root_device)

    @property
    def region_map(self) -> RegionMap | None:
        """The checkpoint's region map, else the configured one (official SAT files carry none)."""
        return self.predictor.model.region_map or self.fallback_region_map

    @property
    def model_info(self) -> dict[str, Any]:
        """Name, kind, the file whose weights were evaluated (the teacher's own file for a LoRKD
        checkpoint's teacher, with its sha256 prefix and the LoRKD checkpoint it was reached through),
        experts and parameter count of the evaluated model (for the reports)."""
        loaded = self.predictor.model
        info = {
            "name": self.name or ("lorkd" if loaded.kind == "experts" else "teacher"),
            "kind": loaded.kind,
            "checkpoint": str(Path(loaded.source or self.checkpoint).resolve()),
            "experts": list(loaded.experts),
            "parameter_count": int(loaded.parameter_count),
            "fingerprint": self.fingerprint,
        }
        if loaded.fingerprint:
            info["checkpoint_sha256"] = loaded.fingerprint
        if loaded.loaded_from:
            info["loaded_from"] = str(Path(loaded.loaded_from).resolve())
        return info

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.pending), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(
            CaseDataset(self.pending),
            batch_size=1,
            sampler=sampler,
            collate_fn=collate_case,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> CaseRecord:
        record = evaluate_record(
            self.predictor, batch["case"], self.settings, self.region_map, self.fingerprint
        )
        if record.ok:
            dice = [r["dice"] for r in record.rows if not math.isnan(r["dice"])]
            log.info(
                "rank %d: %s/%s %d label(s), mean Dice %.4f (%.1f s)",
                self.global_rank, record.dataset, record.case, len(record.rows),
                sum(dice) / max(len(dice), 1), record.seconds,
            )  # fmt: skip
        return record

"""Region-homogeneous sampling (LoRKD): draw a region, keep it for k samples, draw items within it.

Item weight = weight(dataset) / sqrt(size of its (dataset, region) group), as SAT weights datasets
(``sampling_weight / sqrt(size)``) and LoRKD splits multi-region datasets into
``<dataset>_<region>`` pseudo-datasets. A region is drawn with probability proportional to the
sum of its items' weights.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from fnmatch import fnmatchcase

import numpy as np
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def _weight_of(group: str, dataset: str, weights: Mapping[str, float]) -> float:
    """Exact group, then exact dataset, then the first glob pattern (``CT_ORG*``) matching either."""
    if group in weights:
        return float(weights[group])
    if dataset in weights:
        return float(weights[dataset])
    for pattern, w in weights.items():
        if fnmatchcase(group, pattern) or fnmatchcase(dataset, pattern):
            return float(w)
    return 1.0


def item_weights(
    groups: Sequence[str], datasets: Sequence[str], dataset_weights: Mapping[str, float] | None = None
) -> list[float]:
    """Per item: weight of its group (``<dataset>_<region>``) or dataset (default 1) / sqrt(group size).

    ``dataset_weights`` keys are group names, dataset names or glob patterns; a key that matches
    no item is reported (probably a typo).
    """
    weights = dict(dataset_weights or {})
    names = set(groups) | set(datasets)
    unused = sorted(k for k in weights if not any(fnmatchcase(n, k) for n in names))
    if unused:
        log.warning("dataset_weights keys match no training dataset: %s", unused)
    sizes = Counter(groups)
    out = []
    for group, dataset in zip(groups, datasets):
        w = _weight_of(group, dataset, weights)
        if w < 0:
            raise ValueError(f"dataset weight of {group!r} must be >= 0, got {w}")
        out.append(w / math.sqrt(sizes[group]))
    return out


def _dist_state(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


class RegionSampler(DistributedSampler):
    """Yields ``(item index, sample seed)`` keys for :class:`~lorkd.data.datasets.PatchDataset`.

    Each rank draws its own stream from ``np.random.default_rng([seed, epoch, rank])``: deterministic
    given the seed, different across ranks and epochs (call :meth:`set_epoch`; Lightning does). It
    subclasses ``DistributedSampler`` only so that Lightning (``use_distributed_sampler=True``, the
    default) recognises it as rank-aware and leaves it in place; rank and world size default to the
    ``torch.distributed`` state and work without it. ``num_samples`` is the epoch length over all
    ranks; each rank yields ``ceil(num_samples / world_size)``. A region is kept for
    ``region_change_interval`` consecutive samples of a rank (1: every sample independent); with an
    interval that is a multiple of the batch size every batch holds one region. :meth:`resume`
    continues an interrupted epoch where it stopped (the stream is replayed, the consumed keys skipped).
    """

    def __init__(
        self,
        regions: Sequence[int],
        weights: Sequence[float],
        num_samples: int,
        region_change_interval: int = 8,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if len(regions) != len(weights) or not regions:
            raise ValueError(
                f"need one weight per item and at least one item, got {len(regions)} / {len(weights)}"
            )
        if num_samples < 1 or region_change_interval < 1:
            raise ValueError("num_samples and region_change_interval must be >= 1")
        rank, world_size = _dist_state(rank, world_size)
        super().__init__(list(weights), num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.num_samples = math.ceil(num_samples / world_size)
        self.total_size = self.num_samples * world_size
        self.region_change_interval = int(region_change_interval)
        w = np.asarray(weights, dtype=np.float64)
        r = np.asarray(regions, dtype=np.int64)
        self.regions = sorted(int(x) for x in np.unique(r[w > 0]))
        if not self.regions:
            raise ValueError("all item weights are 0")
        self._items = {k: np.flatnonzero((r == k) & (w > 0)) for k in self.regions}
        self._within = {k: w[idx] / w[idx].sum() for k, idx in self._items.items()}
        totals = np.array([w[self._items[k]].sum() for k in self.regions])
        self.region_probs = totals / totals.sum()
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, position: int) -> None:
        """Make the next iteration the rest of ``epoch``: its first ``position`` keys (of this rank) are
        skipped. Should that iteration be of a later epoch (the interrupted one had ended), nothing is."""
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"resume position {position} is outside an epoch of {self.num_samples} samples")
        self.set_epoch(int(epoch))
        self._resume = (int(epoch), int(position))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        region = self.regions[0]
        for i in range(self.num_samples):
            if i % self.region_change_interval == 0:
                region = self.regions[int(rng.choice(len(self.regions), p=self.region_probs))]
            item = self._items[region][int(rng.choice(len(self._items[region]), p=self._within[region]))]
            key = int(item), int(rng.integers(0, 2**63 - 1))
            if i >= skip:
                yield key

    def __len__(self) -> int:
        return self.num_samples

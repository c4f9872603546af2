"""Region sampler: weights, frequencies, region runs, determinism, one stream per rank."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from lorkd.data.sampling import RegionSampler, item_weights

# items: (region, group, dataset)
ITEMS = (
    [(0, "AbdCT_abdomen", "AbdCT")] * 4
    + [(6, "AbdCT_thorax", "AbdCT")] * 1
    + [(6, "Lung_thorax", "Lung")] * 9
    + [(1, "Brain_brain", "Brain")] * 16
)
REGIONS = [r for r, _, _ in ITEMS]
WEIGHTS = item_weights([g for _, g, _ in ITEMS], [d for _, _, d in ITEMS], {"Lung": 3.0, "Brain*": 0.5})


def test_item_weights_are_dataset_weight_over_sqrt_group_size(caplog):
    assert WEIGHTS[:4] == [0.5] * 4  # 1 / sqrt(4)
    assert WEIGHTS[4] == 1.0  # AbdCT_thorax is its own group of 1
    assert WEIGHTS[5:14] == [1.0] * 9  # 3 / sqrt(9)
    assert WEIGHTS[14:] == [0.125] * 16  # glob 0.5 / sqrt(16)
    with caplog.at_level(logging.WARNING):
        assert item_weights(["a_x"], ["a"], {"a_x": 2.0, "typo": 1.0}) == [2.0]
    assert "match no training dataset: ['typo']" in caplog.text


def expected_region_probs():
    totals = Counter()
    for r, w in zip(REGIONS, WEIGHTS):
        totals[r] += w
    return {r: t / sum(totals.values()) for r, t in totals.items()}  # abdomen 2, thorax 10, brain 2


def test_frequencies_match_the_weights():
    sampler = RegionSampler(REGIONS, WEIGHTS, num_samples=40000, region_change_interval=1, seed=3)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 40000
    regions = Counter(REGIONS[i] for i, _ in keys)
    for region, p in expected_region_probs().items():
        assert regions[region] / len(keys) == pytest.approx(p, abs=0.01)
    items = Counter(i for i, _ in keys)
    thorax = sum(items[i] for i in range(4, 14))
    assert items[4] / thorax == pytest.approx(1.0 / 10.0, abs=0.01)  # within a region: proportional to weight
    assert all(items[i] / items[j] == pytest.approx(1.0, abs=0.25) for i, j in [(0, 3), (14, 29)])


def test_region_is_kept_for_k_samples_and_frequencies_still_match():
    sampler = RegionSampler(REGIONS, WEIGHTS, num_samples=40000, region_change_interval=8, seed=0)
    regions = [REGIONS[i] for i, _ in sampler]
    runs = [set(regions[i : i + 8]) for i in range(0, len(regions), 8)]
    assert all(len(r) == 1 for r in runs)
    counts = Counter(r for (r,) in runs)
    for region, p in expected_region_probs().items():
        assert counts[region] / len(runs) == pytest.approx(p, abs=0.02)
    assert len({tuple(r) for r in runs[:50]}) > 1  # and it does change


def test_deterministic_per_seed_epoch_and_rank():
    def keys(seed=0, epoch=0, rank=0, world=1):
        s = RegionSampler(REGIONS, WEIGHTS, num_samples=64, seed=seed, rank=rank, world_size=world)
        s.set_epoch(epoch)
        return list(s)

    assert keys() == keys()
    assert keys() != keys(seed=1) and keys() != keys(epoch=1)
    r0, r1 = keys(rank=0, world=2), keys(rank=1, world=2)
    assert len(r0) == len(r1) == 32 and r0 != r1
    assert keys(rank=1, world=2) == keys(rank=1, world=2)
    assert keys(epoch=1, rank=0, world=2) != keys(epoch=0, rank=1, world=2)  # no seed+rank+epoch collision
    assert len(set(s for _, s in keys())) == 64  # every sample has its own augmentation seed


def test_resume_continues_the_interrupted_epoch_once():
    def sampler():
        return RegionSampler(REGIONS, WEIGHTS, num_samples=32, seed=3, rank=1, world_size=2)

    full = sampler()
    full.set_epoch(2)
    epoch2 = list(full)
    resumed = sampler()
    resumed.resume(epoch=2, position=5)
    assert resumed.epoch == 2 and list(resumed) == epoch2[5:]
    assert list(resumed) == epoch2  # only the first iteration after resume skips
    ended = sampler()
    ended.resume(epoch=2, position=16)  # killed at the end of epoch 2: Lightning goes on with epoch 3
    ended.set_epoch(3)
    full.set_epoch(3)
    assert list(ended) == list(full)
    with pytest.raises(ValueError, match="outside an epoch of 16"):
        sampler().resume(epoch=0, position=17)


def test_rank_defaults_and_lightning_compatibility(tmp_path):
    sampler = RegionSampler(REGIONS, WEIGHTS, num_samples=10, world_size=3, rank=2)
    assert isinstance(sampler, DistributedSampler) and len(sampler) == 4 and sampler.total_size == 12
    alone = RegionSampler(REGIONS, WEIGHTS, num_samples=10)
    assert (alone.rank, alone.num_replicas) == (0, 1)
    with pytest.raises(ValueError, match="invalid rank"):
        RegionSampler(REGIONS, WEIGHTS, num_samples=10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="all item weights are 0"):
        RegionSampler([0, 1], [0.0, 0.0], num_samples=10)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        in_pg = RegionSampler(REGIONS, WEIGHTS, num_samples=10)
        assert (in_pg.rank, in_pg.num_replicas) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_zero_weight_items_and_regions_are_never_drawn():
    weights = [1.0, 0.0, 2.0, 0.0]
    sampler = RegionSampler([0, 0, 1, 2], weights, num_samples=500, region_change_interval=1)
    assert sampler.regions == [0, 1]
    drawn = {i for i, _ in itertools.islice(sampler, 500)}
    assert drawn == {0, 2}
    assert np.isclose(sampler.region_probs.sum(), 1.0)

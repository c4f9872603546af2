"""Training patches (:class:`PatchDataset`), a fixed validation patch set and a case list for test/predict.

Training items are (case, region) pairs: a case whose labels span several expert regions becomes
one item per region holding only that region's labels (LoRKD's ``<dataset>_<region>``
pseudo-datasets). Labels of a region without an expert (SAT's ``whole_body``) are dropped from
training with a warning. A manifest line's ``region`` puts all its labels in that region.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lorkd.data.augment import AugmentConfig, build_augmentation, draw_augment
from lorkd.data.batch import image_torch_dtype, pack_bits, pack_label_window, packed_planes
from lorkd.data.cache import LabelMapMasks, PreprocessCache
from lorkd.data.manifest import Case
from lorkd.data.patches import IndexedCase, box_overlaps, crop_padded, crop_start, index_case, select_queries
from lorkd.data.transforms import PreprocessConfig, preprocess_case
from lorkd.regions import RegionMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchItem:
    """One training item: a case restricted to the labels of one expert region."""

    case_index: int
    region: int
    region_name: str
    label_indices: tuple[int, ...]
    labels: tuple[str, ...]
    dataset: str

    @property
    def group(self) -> str:
        """Sampling group, LoRKD's pseudo-dataset name."""
        return f"{self.dataset}_{self.region_name}"


def expand_items(cases: Sequence[Case], region_map: RegionMap) -> list[PatchItem]:
    """Split each case into one :class:`PatchItem` per expert region of its labels."""
    items: list[PatchItem] = []
    dropped: dict[tuple[str, str], int] = {}
    for ci, case in enumerate(cases):
        by_region: dict[int, list[int]] = {}
        for li, label in enumerate(case.labels):
            if case.region is not None:
                expert: int | None = region_map.region_index(case.region)
            else:
                expert = region_map.expert_of(label, case.modality)
            if expert is None:
                key = (case.dataset, f"{case.modality}_{label}")
                dropped[key] = dropped.get(key, 0) + 1
                continue
            by_region.setdefault(expert, []).append(li)
        for region in sorted(by_region):
            idx = tuple(by_region[region])
            items.append(
                PatchItem(
                    case_index=ci,
                    region=region,
                    region_name=region_map.regions[region],
                    label_indices=idx,
                    labels=tuple(case.labels[i] for i in idx),
                    dataset=case.dataset,
                )
            )
    for (dataset, label), count in sorted(dropped.items()):
        log.warning(
            "%s: label %r has no expert region; dropped from training in %d case(s)", dataset, label, count
        )
    return items


def _plain(t: Any) -> torch.Tensor:
    """MONAI may return MetaTensors; downstream code gets plain tensors."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class PatchDataset(Dataset):
    """Random training patches with SAT's crop, query choice and augmentations.

    Index it with the ``(item, seed)`` keys of :class:`~lorkd.data.sampling.RegionSampler` (the
    patch then depends on that seed only, whatever the worker) or with a plain item index (the patch
    then depends on ``(seed, index)``). With probability ``label_centered_prob`` a patch is centred
    on a voxel of a random label present in the item, else placed uniformly. ``cache`` None
    preprocesses the case on every access (slow; for benchmarks and tiny runs).

    A sample: ``image`` (1,X,Y,Z) in ``image_dtype``, ``mask_bits`` uint8 (ceil(n/8),X,Y,Z) (the n masks
    packed by :func:`~lorkd.data.batch.pack_bits`), ``labels`` (n names), ``modality``, ``region``
    (expert index), ``dataset``, ``case_id``. With ``augment_on_device`` the worker only crops and the
    sample also carries ``augment``, the draws of :func:`~lorkd.data.augment.draw_augment` that
    :func:`~lorkd.data.batch.finish_batch` applies to the batch on the device; otherwise MONAI augments
    the sample here, with the same draws.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        cache: PreprocessCache | None,
        cfg: PreprocessConfig | dict[str, Any] | None = None,
        patch_size: Sequence[int] = (64, 64, 32),
        max_queries: int = 8,
        label_centered_prob: float = 1.0,
        augment: AugmentConfig | dict[str, Any] | bool = True,
        region_map: RegionMap | None = None,
        seed: int = 0,
        neg_ratio: float = 0.5,
        open_cases: int = 32,
        augment_on_device: bool = False,
        image_dtype: str = "float32",
    ) -> None:
        if region_map is None:
            raise ValueError("PatchDataset needs a region_map to give each sample its expert region")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size!r}")
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        if not 0.0 <= label_centered_prob <= 1.0:
            raise ValueError(f"label_centered_prob must be in [0, 1], got {label_centered_prob}")
        self.cases = list(cases)
        self.cache = cache
        self.cfg = PreprocessConfig.coerce(cfg)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.max_queries = int(max_queries)
        self.label_centered_prob = float(label_centered_prob)
        self.augment_cfg = AugmentConfig.coerce(augment)
        self.augment = build_augmentation(self.augment_cfg)
        self.augment_on_device = bool(augment_on_device)
        self.image_dtype = image_torch_dtype(image_dtype)
        self.region_map = region_map
        self.seed = int(seed)
        self.neg_ratio = float(neg_ratio)
        self.items = expand_items(self.cases, region_map)
        if not self.items:
            raise ValueError("no training item: no case has a label of an expert region")
        self._open_cases = int(open_cases)
        self._open: OrderedDict[int, IndexedCase] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # memory-mapped entries are reopened in each worker
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.items)

    def load(self, case_index: int) -> IndexedCase:
        """The preprocessed case (cache entries stay open for the last ``open_cases`` cases)."""
        if self.cache is None:
            return index_case(preprocess_case(self.cases[case_index], self.cfg))
        entry = self._open.pop(case_index, None) or self.cache.get(self.cases[case_index], self.cfg)
        self._open[case_index] = entry
        while len(self._open) > self._open_cases:
            self._open.popitem(last=False)
        return entry

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, sample_seed = key
            rng = np.random.default_rng(sample_seed)
        else:
            index = int(key)
            rng = np.random.default_rng([self.seed, index])
        return self.sample(index, rng)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        item = self.items[index]
        case = self.cases[item.case_index]
        entry = self.load(item.case_index)
        data, boxes, voxels = entry.data, entry.index.boxes, entry.index.voxels
        spatial = data.image.shape[1:]

        center = None
        if rng.random() < self.label_centered_prob:
            candidates = [j for j in item.label_indices if len(voxels[j])]
            if candidates:
                chosen = voxels[candidates[int(rng.integers(len(candidates)))]]
                center = chosen[int(rng.integers(len(chosen)))]
        start = crop_start(spatial, self.patch_size, rng, center)

        present, bits_of = self._label_crops(data.masks, boxes, item.label_indices, start)
        chosen_pos = select_queries(present, self.max_queries, rng, self.neg_ratio)
        label_ids = [item.label_indices[k] for k in chosen_pos]
        bits = bits_of(label_ids)
        image = crop_padded(data.image, start, self.patch_size, fill=data.info.background).astype(np.float32, copy=False)

        image_t, bits_t, extra = torch.from_numpy(image), torch.from_numpy(bits), {}
        if self.augment is not None:
            seed = int(rng.integers(0, 2**32 - 1))
            if self.augment_on_device:
                extra["augment"] = draw_augment(self.augment_cfg, seed)
            else:
                self.augment.set_random_state(seed=seed)
                out = self.augment({"image": image_t, "masks": bits_t.float()})  # nearest moves a voxel's bits together
                image_t, bits_t = _plain(out["image"]).float(), _plain(out["masks"]).round().to(torch.uint8)
        return {
            "image": image_t.to(self.image_dtype).contiguous(),
            "mask_bits": bits_t.contiguous(),
            "labels": [case.labels[j] for j in label_ids],
            "modality": case.modality,
            "region": item.region,
            "dataset": case.dataset,
            "case_id": case.id,
            **extra,
        }

    def _label_crops(
        self, masks: Any, boxes: Sequence[Any], label_indices: Sequence[int], start: Sequence[int]
    ) -> tuple[list[bool], Any]:
        """Which of the item's labels the crop at ``start`` holds, and a function from the chosen label
        indices to their packed mask bits. A label-map cache entry is read once for all labels."""
        patch = self.patch_size
        if isinstance(masks, LabelMapMasks):
            window = crop_padded(masks.label_map[None], start, patch)[0]
            counts = np.bincount(window.ravel(), minlength=len(masks) + 1)
            present = [bool(counts[j + 1]) for j in label_indices]
            return present, lambda ids: pack_label_window(window, [j + 1 for j in ids])
        crops: dict[int, np.ndarray] = {}
        for j in label_indices:
            if box_overlaps(boxes[j], start, patch):
                crop = crop_padded(masks, start, patch, channels=slice(j, j + 1))[0]
                if crop.any():
                    crops[j] = crop
        empty = np.zeros(patch, dtype=np.uint8)
        return [j in crops for j in label_indices], lambda ids: pack_bits([crops.get(j, empty) for j in ids], patch)


class ValidationPatches(Dataset):
    """A fixed set of label-centred, unaugmented patches (``patches_per_item`` per item) for patch Dice."""

    def __init__(self, dataset: PatchDataset, patches_per_item: int = 1, seed: int = 0) -> None:
        if dataset.augment is not None or dataset.label_centered_prob != 1.0:
            raise ValueError(
                "validation patches need a PatchDataset with augment=False and label_centered_prob=1"
            )
        self.dataset = dataset
        seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=len(dataset) * patches_per_item)
        self.keys = [(i // patches_per_item, int(s)) for i, s in enumerate(seeds)]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[self.keys[index]]


def collate_patches(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack patches; mask bits zero-padded to the largest query count, ``query_mask`` marks real queries;
    ``augment`` (a list of per-sample draws) when the samples carry draws for the device."""
    if not samples:
        raise ValueError("collate_patches: empty batch")
    n = max(len(s["labels"]) for s in samples)
    first = samples[0]["mask_bits"]
    bits = first.new_zeros((len(samples), packed_planes(n), *first.shape[1:]))
    query_mask = torch.zeros((len(samples), n), dtype=torch.bool)
    for b, s in enumerate(samples):
        bits[b, : s["mask_bits"].shape[0]] = s["mask_bits"]
        query_mask[b, : len(s["labels"])] = True
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "mask_bits": bits,
        "query_mask": query_mask,
        "labels": [list(s["labels"]) for s in samples],
        "modality": [s["modality"] for s in samples],
        "region": torch.tensor([int(s["region"]) for s in samples], dtype=torch.long),
        "dataset": [s["dataset"] for s in samples],
        "case_id": [s["case_id"] for s in samples],
    }
    if any("augment" in s for s in samples):
        batch["augment"] = [s.get("augment", {}) for s in samples]
    return batch


class CaseDataset(Dataset):
    """Whole cases for test/predict: item ``i`` is ``{"index": i, "case": Case}`` (the caller preprocesses)."""

    def __init__(self, cases: Sequence[Case]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": int(index), "case": self.cases[index]}


def collate_case(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch size 1 collate for :class:`CaseDataset`: the item itself."""
    if len(batch) != 1:
        raise ValueError(f"CaseDataset loaders use batch_size=1, got a batch of {len(batch)}")
    return batch[0]

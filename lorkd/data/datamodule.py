"""Lightning DataModule: region-sampled training patches, fixed validation patches, whole test/predict cases."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lorkd.data.augment import AugmentConfig
from lorkd.data.batch import finish_batch, image_torch_dtype
from lorkd.data.cache import PreprocessCache
from lorkd.data.datasets import (
    CaseDataset,
    PatchDataset,
    ValidationPatches,
    collate_case,
    collate_patches,
)
from lorkd.data.manifest import Case, add_labels, load_manifest
from lorkd.data.nnunet import DatasetError, ImportedDataset, ImportOptions, import_dataset, is_dataset_folder
from lorkd.data.sampling import RegionSampler, item_weights
from lorkd.data.transforms import PreprocessConfig
from lorkd.regions import RegionMap
from lorkd.utils import plain

log = logging.getLogger(__name__)


def augment_on_device(cfg: AugmentConfig) -> bool:
    """Whether training batches are augmented on the device: ``augment.on_device``, where "auto" means yes on
    every device (on a GPU it frees the workers; on the CPU the batched path measured N times faster per
    sample than MONAI's per-sample path at one thread: scripts/benchmarks/RESULTS.md, issue 29)."""
    return cfg.enabled and (cfg.on_device == "auto" or bool(cfg.on_device))


def unique_cases(cases: list[Case], split: str) -> list[Case]:
    """``cases`` (of several manifests or dataset folders); a ValueError names a (dataset, id) found twice."""
    first: dict[tuple[str, str], Case] = {}
    twice = []
    for case in cases:
        seen = first.setdefault((case.dataset, case.id), case)
        if seen is not case:
            twice.append(f"{case.source}: case {case.id!r} of dataset {case.dataset!r} is also in {seen.source}")
    if twice:
        raise ValueError(f"data.{split}_manifest: {len(twice)} case(s) given twice:\n" + "\n".join(twice))
    return cases


class LoRKDDataModule(L.LightningDataModule):
    """Train / val / test / predict data from jsonl manifests.

    * train: :class:`PatchDataset` drawn by :class:`RegionSampler` (region-homogeneous runs of
      ``region_change_interval`` samples, ``samples_per_epoch`` samples per epoch over all ranks).
      The sampler does its own DDP split (one stream per rank, seeded by seed, epoch and rank) and
      subclasses ``DistributedSampler``, so the Trainer keeps the default
      ``use_distributed_sampler=True``: Lightning leaves this sampler alone and still gives
      val/test/predict their distributed samplers (predict: no case twice).
    * val: :class:`ValidationPatches`, fixed label-centred patches without augmentation.
    * test / predict: :class:`CaseDataset` with batch size 1; a batch is ``{"index", "case"}`` and
      the evaluator / predictor preprocesses the case itself.

    A manifest may also be an nnU-Net v2 or Decathlon dataset folder (:mod:`lorkd.data.nnunet`, read with
    ``dataset_import``'s options): ``train_manifest=DIR`` trains on its train split and, without a
    ``val_manifest``, validates on its val split; ``test_manifest=DIR``/``predict_manifest=DIR`` read its
    ``imagesTs``. Each manifest may be a list of manifests and dataset folders, read in order as one (a case,
    by dataset and id, at most once; without a ``val_manifest``, the folders among the training entries give
    validation). Labels new to the region map (their lines' ``label_region``) are added to ``region_map``,
    which training shares with the model, so that its checkpoints know them. ``regions`` keeps only the
    training and validation items of those expert regions (fine-tuning one expert).

    Batches leave the workers with the masks packed into bits and the image in ``image_dtype``;
    :meth:`on_after_batch_transfer` turns them into float32 image and masks on the device, after
    applying the batch's augmentation there when ``augment.on_device`` says so (see
    :func:`augment_on_device`).

    ``batch_size`` is per device. With ``cache_dir`` set, every case is preprocessed once into
    the cache (in ``prepare_data``, i.e. by local rank 0, and lazily by whoever misses an entry);
    without it, cases are preprocessed on every access.
    """

    def __init__(
        self,
        train_manifest: str | Path | None = None,
        val_manifest: str | Path | None = None,
        test_manifest: str | Path | None = None,
        predict_manifest: str | Path | None = None,
        cache_dir: str | Path | None = None,
        preprocess: PreprocessConfig | Mapping[str, Any] | None = None,
        patch_size: Sequence[int] = (64, 64, 32),
        batch_size: int = 2,
        num_workers: int = 0,
        max_queries: int = 8,
        samples_per_epoch: int = 256,
        region_change_interval: int = 8,
        dataset_weights: Mapping[str, float] | None = None,
        augment: AugmentConfig | Mapping[str, Any] | bool = True,
        label_centered_prob: float = 1.0,
        region_map: RegionMap | None = None,
        seed: int = 0,
        neg_ratio: float = 0.5,
        val_patches_per_item: int = 1,
        warm_cache: bool = True,
        image_dtype: str = "float32",
        dataset_import: ImportOptions | Mapping[str, Any] | None = None,
        regions: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        train_manifest, val_manifest, test_manifest, predict_manifest = (
            plain(m) for m in (train_manifest, val_manifest, test_manifest, predict_manifest)
        )
        if val_manifest is None and is_dataset_folder(train_manifest):
            val_manifest = train_manifest
        elif val_manifest is None and isinstance(train_manifest, list):
            val_manifest = [entry for entry in train_manifest if is_dataset_folder(entry)] or None
        self.dataset_import = ImportOptions.coerce(plain(dataset_import))
        self._imported: dict[str, ImportedDataset] = {}
        self.regions = list(plain(regions)) if regions else None
        self.manifests = {
            "train": train_manifest,
            "val": val_manifest,
            "test": test_manifest,
            "predict": predict_manifest,
        }
        self.cache = PreprocessCache(cache_dir) if cache_dir else None
        self.preprocess = PreprocessConfig.coerce(plain(preprocess))
        self.patch_size = tuple(int(p) for p in plain(patch_size))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.max_queries = int(max_queries)
        self.samples_per_epoch = int(samples_per_epoch)
        self.region_change_interval = int(region_change_interval)
        self.dataset_weights = dict(plain(dataset_weights) or {})
        self.augment = AugmentConfig.coerce(plain(augment))
        self.label_centered_prob = float(label_centered_prob)
        self.region_map = region_map
        self.seed = int(seed)
        self.neg_ratio = float(neg_ratio)
        self.val_patches_per_item = int(val_patches_per_item)
        self.warm_cache = bool(warm_cache)
        image_torch_dtype(image_dtype)  # an unknown name fails here, not in a worker
        self.image_dtype = image_dtype
        self.cases: dict[str, list[Case]] = {}
        self.train_set: PatchDataset | None = None
        self.val_set: ValidationPatches | None = None
        self.sampler: RegionSampler | None = None
        self._resume: dict[str, int] = {}

    def cases_of(self, split: str) -> list[Case]:
        """Validated cases of a split (loaded once); predict manifests need no masks."""
        if split not in self.cases:
            path = self.manifests[split]
            entries = path if isinstance(path, (list, tuple)) else [path] if path is not None else []
            if not entries:
                raise ValueError(f"no {split}_manifest configured (set data.{split}_manifest=...)")
            cases: list[Case] = []
            for entry in entries:
                if is_dataset_folder(entry):
                    cases += self._dataset_cases(entry, split)
                else:
                    cases += load_manifest(entry, require_masks=split != "predict", region_map=self.region_map)
            self.cases[split] = unique_cases(cases, split)
            if self.region_map is not None:
                add_labels(self.region_map, self.cases[split])
        return self.cases[split]

    def _dataset_cases(self, folder: str | Path, split: str) -> list[Case]:
        """A dataset folder's cases of ``split`` (predict and test: its imagesTs), imported once."""
        key = str(folder)
        if key not in self._imported:
            self._imported[key] = import_dataset(folder, self.dataset_import, self.region_map)
        imported = self._imported[key]
        part = {"predict": "test"}.get(split, split)
        if part not in imported.cases:
            raise DatasetError(imported.folder, [f"{imported.folder}: 4-D images: write their channel out with `lorkd-data import {folder} out=DIR channel=...` and train on DIR's manifests"])
        cases = imported.cases[part]
        if not cases:
            raise DatasetError(imported.folder, [f"{imported.folder}: no {part} cases for data.{split}_manifest"])
        if split == "test" and any(c.mask is None for c in cases):
            raise DatasetError(imported.folder, [f"{imported.folder}: imagesTs has no labelsTs to evaluate against"])
        return cases

    def prepare_data(self) -> None:
        if self.cache is None or not self.warm_cache:
            return
        for split in ("train", "val"):
            if self.manifests[split] is None:
                continue
            cases = self.cases_of(split)
            log.info("preprocessing %d %s case(s) into %s", len(cases), split, self.cache.root)
            for case in cases:
                self.cache.get(case, self.preprocess)

    def _patches(self, split: str, training: bool) -> PatchDataset:
        """The split's patches; with ``regions``, only the items of those expert regions."""
        dataset = PatchDataset(
            self.cases_of(split),
            self.cache,
            self.preprocess,
            patch_size=self.patch_size,
            max_queries=self.max_queries,
            label_centered_prob=self.label_centered_prob if training else 1.0,
            augment=self.augment if training else False,
            region_map=self.region_map,
            seed=self.seed,
            neg_ratio=self.neg_ratio,
            augment_on_device=training and augment_on_device(self.augment),
            image_dtype=self.image_dtype,
        )
        if self.regions is not None:
            dataset.items = [item for item in dataset.items if item.region_name in self.regions]
            if not dataset.items:
                raise ValueError(f"data.regions={self.regions}: no {split} case has a label of these regions")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.manifests["train"] is not None:
            self.train_set = self._patches("train", training=True)
        if stage in (None, "fit", "validate") and self.manifests["val"] is not None:
            self.val_set = ValidationPatches(
                self._patches("val", training=False), self.val_patches_per_item, seed=self.seed
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Float32 image and masks on the device, the batch augmented there when it carries draws."""
        return finish_batch(batch)

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        # an own generator: starting an iteration (workers' base seed) never draws from torch's global
        # RNG, so validation does not change the random stream of training (exact resume)
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("no training data: set data.train_manifest and call setup('fit')")
        items = self.train_set.items
        self.sampler = RegionSampler(
            regions=[it.region for it in items],
            weights=item_weights(
                [it.group for it in items], [it.dataset for it in items], self.dataset_weights
            ),
            num_samples=self.samples_per_epoch,
            region_change_interval=self.region_change_interval,
            seed=self.seed,
        )
        if self._resume:
            self.sampler.resume(self._resume["epoch"], self._resume["position"])
            self._resume = {}
        return self._loader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=collate_patches,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise ValueError("no validation data: set data.val_manifest")
        return self._loader(
            self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=collate_patches
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(
            CaseDataset(self.cases_of("test")), batch_size=1, shuffle=False, collate_fn=collate_case
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            CaseDataset(self.cases_of("predict")), batch_size=1, shuffle=False, collate_fn=collate_case
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the sampler's epoch (stored in checkpoints by Lightning): the epoch and
        the samples of it this rank has trained on, so that a resumed run continues the same stream."""
        trainer = self.trainer
        if self.sampler is None or trainer is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"epoch": int(self.sampler.epoch), "position": int(batches) * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the sampler there (applied when the training loader is built)."""
        self._resume = {k: int(state_dict[k]) for k in ("epoch", "position")} if state_dict else {}

    def describe(self) -> dict[str, Any]:
        """What inference must reproduce (stored in checkpoints): preprocessing and the training patch size."""
        return {"preprocess": self.preprocess.to_dict(), "patch_size": list(self.patch_size)}

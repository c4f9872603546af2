"""Training loader at the scale users run (issue 29): patches/s per worker, bytes per sample, batched augmentation.

    python scripts/benchmarks/loader.py [--patches 16] [--baseline-patches 6] [--batch 8] [--threads 1]

One process at ``--threads`` torch threads (1, as in a DataLoader worker). A synthetic 512x512x300 CT
(0.8x0.8x1.5 mm, an elliptic body with 15 abdominal organs as a label map) is preprocessed into the cache
once (sat_ds's recipe: 1x1x3 mm, foreground crop), then patches of sat_ds's shape (288x288x96, up to 16
queries, label-centred) are cut from it by

* today's path before issue 29 (kept below as the baseline): float32 masks, one label-map read per
  label, MONAI's augmentations per sample in the worker;
* ours: masks packed into bits, the image in sat_ds's ``image_dtype``; augmentation in the worker
  (``augment.on_device: false``) or only its draws there (``true``/``auto``: applied on the device);

and the augmentation itself is timed on ``--batch`` samples: MONAI per sample on float masks (today)
against :func:`lorkd.data.augment.apply_augment` on the whole batch with packed masks, for SAT's
probabilities (the same draws for both) and with every transform firing. Ratios are taken in this process.

:func:`measure_loader` gives the figures for any data config (``scripts/benchmarks/scale.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd.data.augment import AugmentConfig, apply_augment, build_augmentation, draw_augment
from lorkd.data.batch import image_torch_dtype, packed_planes
from lorkd.data.cache import PreprocessCache
from lorkd.data.datamodule import augment_on_device
from lorkd.data.datasets import PatchDataset, _plain
from lorkd.data.manifest import Case
from lorkd.data.patches import box_overlaps, crop_padded, crop_start, select_queries
from lorkd.data.transforms import PreprocessConfig
from lorkd.regions import RegionMap
from lorkd.utils import plain

SIZE, SPACING = (512, 512, 300), (0.8, 0.8, 1.5)


def synthetic_ct_case(folder: Path, n_labels: int = 15, size: Sequence[int] = SIZE) -> Case:
    """A CT-sized case written to ``folder``: air, an elliptic body (340x240 mm), a spine and ``n_labels``
    abdominal organs (ellipsoids from sat49's abdomen labels, non-overlapping), int16 HU and a label map."""
    import nibabel as nib

    regions = RegionMap.from_config("sat49")
    names = sorted(k.split("_", 1)[1] for k, r in regions.label_region.items() if r == "abdomen" and k.startswith("ct_"))
    labels = names[:n_labels]
    x, y, z = (np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in size)
    x, y, z = x * SPACING[0], y * SPACING[1], z * SPACING[2]
    body = (x[:, None] / 170) ** 2 + (y[None] / 120) ** 2 < 1
    image = np.where(body, 40, -1000).astype(np.int16)[:, :, None].repeat(size[2], axis=2)
    ids = np.zeros(size, np.uint8)
    rng = np.random.default_rng(0)
    for j in range(n_labels):  # organs on a 5x3 grid of the body's cross-section, staggered along z
        cx, cy = -110 + 55 * (j % 5), -60 + 55 * (j // 5)
        cz, rz = -150 + 300 * (j + 0.5) / n_labels, 60.0
        organ = ((x[:, None, None] - cx) / 22) ** 2 + ((y[None, :, None] - cy) / 20) ** 2 + ((z[None, None] - cz) / rz) ** 2 < 1
        ids[organ] = j + 1
        image[organ] = 30 + 4 * j
    image[((x[:, None] / 18) ** 2 + ((y[None] - 80) / 18) ** 2 < 1)[:, :, None].repeat(size[2], axis=2)] = 700
    image = (image + rng.normal(0, 10, size)).astype(np.int16)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "ct.nii")
    nib.save(nib.Nifti1Image(ids, affine), folder / "labels.nii")
    return Case(folder / "ct.nii", labels, "ct", "Synthetic", folder / "labels.nii", None, "ct512", None, None, 1, folder)


def legacy_sample(ds: PatchDataset, key: tuple[int, int]) -> dict[str, Any]:
    """A sample as PatchDataset made it before issue 29 (the baseline): float32 masks, the label map read
    once per label, MONAI's augmentations on the sample."""
    index, seed = key
    rng = np.random.default_rng(seed)
    item = ds.items[index]
    entry = ds.load(item.case_index)
    data, boxes, voxels = entry.data, entry.index.boxes, entry.index.voxels
    center = None
    if rng.random() < ds.label_centered_prob:
        candidates = [j for j in item.label_indices if len(voxels[j])]
        if candidates:
            chosen = voxels[candidates[int(rng.integers(len(candidates)))]]
            center = chosen[int(rng.integers(len(chosen)))]
    start = crop_start(data.image.shape[1:], ds.patch_size, rng, center)
    crops = {}
    for j in item.label_indices:
        if box_overlaps(boxes[j], start, ds.patch_size):
            crop = crop_padded(data.masks, start, ds.patch_size, channels=slice(j, j + 1))[0]
            if crop.any():
                crops[j] = crop
    chosen_pos = select_queries([j in crops for j in item.label_indices], ds.max_queries, rng, ds.neg_ratio)
    empty = np.zeros(ds.patch_size, dtype=np.uint8)
    masks = np.stack([crops.get(item.label_indices[k], empty) for k in chosen_pos]).astype(np.float32)
    image = crop_padded(data.image, start, ds.patch_size, fill=data.info.background).astype(np.float32)
    image_t, masks_t = torch.from_numpy(image), torch.from_numpy(masks)
    if ds.augment is not None:
        ds.augment.set_random_state(seed=int(rng.integers(0, 2**32 - 1)))
        out = ds.augment({"image": image_t, "masks": masks_t})
        image_t, masks_t = _plain(out["image"]).float(), (_plain(out["masks"]) > 0.5).float()
    return {"image": image_t.contiguous(), "masks": masks_t.contiguous()}


@dataclass
class LoaderFigures:
    """What :func:`measure_loader` measured: one worker's patches/s and what its samples weigh."""

    patches_per_s: float
    bytes_per_sample: float  # mean over the measured samples (image + mask bits, augmentation draws aside)
    bytes_at_max_queries: int  # a sample with max_queries queries
    augment_on_device: bool
    patch_size: tuple[int, ...]
    max_queries: int


def dataset_for(data: Mapping[str, Any], case: Case, cache: PreprocessCache, legacy: bool = False) -> PatchDataset:
    """The training PatchDataset a data config (``cfg.data``) builds, on ``case``."""
    data = plain(data)
    augment = AugmentConfig.coerce(data.get("augment", True))
    return PatchDataset(
        [case], cache, PreprocessConfig.coerce(data.get("preprocess")), patch_size=tuple(data["patch_size"]),
        max_queries=int(data["max_queries"]), label_centered_prob=float(data.get("label_centered_prob", 1.0)),
        augment=augment, region_map=RegionMap.from_config("sat49"), neg_ratio=float(data.get("neg_ratio", 0.5)),
        augment_on_device=augment_on_device(augment) and not legacy,
        image_dtype="float32" if legacy else str(data.get("image_dtype", "float32")),
    )  # fmt: skip


def _rate(fetch: Any, keys: Sequence[tuple[int, int]]) -> tuple[float, list[dict[str, Any]]]:
    fetch(keys[0])  # the entry opened, MONAI imported: outside the timing
    start = time.perf_counter()
    samples = [fetch(k) for k in keys]
    return len(keys) / (time.perf_counter() - start), samples


def _weight(sample: Mapping[str, Any]) -> int:
    return sum(v.nbytes for k, v in sample.items() if isinstance(v, torch.Tensor))


def measure_loader(
    data: Mapping[str, Any], patches: int = 8, threads: int = 1, workdir: str | Path | None = None
) -> LoaderFigures:
    """Patches/s of one loader worker (``threads`` torch threads) from the cache and bytes per sample, for the
    data config ``data`` (e.g. ``cfg.data`` of ``experiment=pro``: its patch size, queries, augmentation,
    ``image_dtype``) on the synthetic 512x512x300 CT; ``workdir`` keeps the case and its cache (else a
    temporary folder)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(workdir or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            case = _case(folder)
            ds = dataset_for(data, case, PreprocessCache(folder / "cache"))
            rate, samples = _rate(ds.__getitem__, [(0, seed) for seed in range(patches + 1)])
    finally:
        torch.set_num_threads(previous)
    voxels = int(np.prod(ds.patch_size))
    at_max = voxels * (image_torch_dtype(str(plain(data).get("image_dtype", "float32"))).itemsize + packed_planes(ds.max_queries))
    return LoaderFigures(
        rate, float(np.mean([_weight(s) for s in samples])), at_max, ds.augment_on_device, ds.patch_size, ds.max_queries
    )


def _case(folder: Path) -> Case:
    if not (folder / "ct.nii").is_file() or not (folder / "labels.nii").is_file():
        return synthetic_ct_case(folder)
    regions = RegionMap.from_config("sat49")
    names = sorted(k.split("_", 1)[1] for k, r in regions.label_region.items() if r == "abdomen" and k.startswith("ct_"))
    return Case(folder / "ct.nii", names[:15], "ct", "Synthetic", folder / "labels.nii", None, "ct512", None, None, 1, folder)


def _augmentation_rows(batch: int, cfg: AugmentConfig, base: PatchDataset) -> list[tuple[str, float, float, str]]:
    """(draws, today's ms per sample, batched ms per sample, steps fired) for SAT's draws and for all firing."""
    samples = [base[(0, seed)] for seed in range(batch)]
    image = torch.stack([s["image"].float() for s in samples])
    bits = torch.stack([torch.nn.functional.pad(s["mask_bits"], [0, 0, 0, 0, 0, 0, 0, 2 - len(s["mask_bits"])]) for s in samples])
    masks = [torch.stack([((s["mask_bits"][q // 8] >> (q % 8)) & 1).float() for q in range(len(s["labels"]))]) for s in samples]
    every = AugmentConfig.coerce({**{k: 1.0 for k in ("zoom_prob", "noise_prob", "sharpen_prob", "scale_intensity_prob",
                                                     "contrast_inverted_prob", "contrast_prob")}})  # fmt: skip
    rows = []
    for label, which, seeds, measured in (("SAT's probabilities", cfg, range(batch), batch), ("every transform fires", every, range(batch), 2)):
        draws = [draw_augment(which, 1000 + s) for s in seeds]
        compose = build_augmentation(which)
        start = time.perf_counter()
        for b in range(measured):  # today: MONAI per sample, float masks, then > 0.5 and back to float
            compose.set_random_state(seed=1000 + b)
            out = compose({"image": image[b], "masks": masks[b]})
            _plain(out["image"]).float(), (_plain(out["masks"]) > 0.5).float()
        today = (time.perf_counter() - start) / measured
        start = time.perf_counter()
        apply_augment(image, bits, draws)
        batched = (time.perf_counter() - start) / batch
        fired = sorted({name for d in draws[:measured] for name in d})
        rows.append((label, today * 1000, batched * 1000, ", ".join(fired) or "none"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=16, help="patches timed on our path")
    parser.add_argument("--baseline-patches", type=int, default=6, help="patches timed on today's path")
    parser.add_argument("--batch", type=int, default=8, help="samples in the batched augmentation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the synthetic case and its cache here")
    args = parser.parse_args()
    from omegaconf import OmegaConf

    from lorkd.utils import CONFIG_DIR

    torch.set_num_threads(args.threads)
    sat_ds = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "sat_ds.yaml"))
    sat_ds.pop("region_map"), sat_ds.pop("seed"), sat_ds.pop("cache_dir")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        case = _case(folder)
        written = time.perf_counter() - start
        cache = PreprocessCache(folder / "cache")
        start = time.perf_counter()
        entry = cache.get(case, PreprocessConfig.coerce(sat_ds["preprocess"]))
        fill = time.perf_counter() - start
        shape = entry.data.image.shape[1:]
        rows = []
        for augment in (False, True):
            config = {**sat_ds, "augment": sat_ds["augment"] if augment else False}
            legacy = dataset_for(config, case, cache, legacy=True)
            keys = [(0, seed) for seed in range(args.baseline_patches + 1)]
            rate, samples = _rate(lambda k, ds=legacy: legacy_sample(ds, k), keys)
            rows.append(("today: float32 masks" + (", MONAI in the worker" if augment else ""), augment, rate, np.mean([_weight(s) for s in samples]), rate))
            modes = [False, True] if augment else [False]
            for on_device in modes:
                config["augment"] = {**sat_ds["augment"], "on_device": on_device} if augment else False
                ours = dataset_for(config, case, cache)
                keys = [(0, seed) for seed in range(args.patches + 1)]
                ours_rate, samples = _rate(ours.__getitem__, keys)
                what = "ours: bits, " + sat_ds["image_dtype"] + (", draws only (augmented on the device)" if on_device else ", MONAI in the worker" if augment else "")
                rows.append((what, augment, ours_rate, np.mean([_weight(s) for s in samples]), rate))
        base = dataset_for({**sat_ds, "augment": False}, case, cache)
        aug_rows = _augmentation_rows(args.batch, AugmentConfig.coerce(sat_ds["augment"]), base)
    voxels = int(np.prod(sat_ds["patch_size"]))
    print(f"# loader, sat_ds config: patch {tuple(sat_ds['patch_size'])}, max {sat_ds['max_queries']} queries; synthetic CT "
          f"{SIZE} at {SPACING} mm, 15 labels (label map) -> {tuple(shape)} voxels after preprocessing")  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), 1 process, load average {os.getloadavg()[0]:.1f}; "
          f"case written in {written:.1f} s, cache fill {fill:.1f} s")  # fmt: skip
    print()
    print("| path | augment | patches/s per worker | ms/patch | MiB/sample | speed vs today | bytes vs today |")
    print("|---|---|---|---|---|---|---|")
    for what, augment, rate, weight, today in rows:
        ref = next(b for w, a, _, b, _ in rows if a == augment and w.startswith("today"))
        print(f"| {what} | {'on' if augment else 'off'} | {rate:.2f} | {1000 / rate:.0f} | {weight / 2**20:.1f} | "
              f"{rate / today:.1f}x | {weight / ref:.3f}x |")  # fmt: skip
    print()
    print(f"MiB per sample at {sat_ds['max_queries']} queries: today {voxels * (4 + 4 * sat_ds['max_queries']) / 2**20:.0f}, "
          f"ours {voxels * (image_torch_dtype(sat_ds['image_dtype']).itemsize + packed_planes(sat_ds['max_queries'])) / 2**20:.1f} "
          f"({sat_ds['image_dtype']} image + {packed_planes(sat_ds['max_queries'])} byte planes of mask bits)")  # fmt: skip
    print()
    print(f"| augmentation of {args.batch} samples | today: MONAI per sample, ms/sample | ours: batched torch ops, ms/sample | speed-up | fired |")
    print("|---|---|---|---|---|")
    for label, today, batched, fired in aug_rows:
        print(f"| {label} | {today:.0f} | {batched:.0f} | {today / batched:.1f}x | {fired} |")


if __name__ == "__main__":
    main()

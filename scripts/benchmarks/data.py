"""Training patches per second from the preprocessing cache vs preprocessing on the fly (demo data).

    python scripts/benchmarks/data.py [--data outputs/demo/data] [--patches 512] [--fly-patches 64] [--threads 1]

One process at ``--threads`` torch threads (1, as in a DataLoader worker), the demo config's patch
size / queries / augmentations, the same RegionSampler stream for both sources. Without ``--data``
(or when it has no train.jsonl) the demo set is built into a temporary folder first.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lorkd.data.cache import PreprocessCache
from lorkd.data.datasets import PatchDataset, expand_items
from lorkd.data.demo import build_demo
from lorkd.data.manifest import load_manifest
from lorkd.data.sampling import RegionSampler, item_weights
from lorkd.data.transforms import PreprocessConfig, preprocess_case
from lorkd.regions import RegionMap
from lorkd.utils import CONFIG_DIR


def rate(dataset: PatchDataset, keys: list[tuple[int, int]]) -> tuple[int, float]:
    start = time.perf_counter()
    for key in keys:
        dataset[key]
    return len(keys), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="demo data folder (default: build a temporary one)"
    )
    parser.add_argument("--patches", type=int, default=512, help="patches drawn from the cache")
    parser.add_argument(
        "--fly-patches", type=int, default=64, help="patches drawn with on-the-fly preprocessing"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.data and (args.data / "train.jsonl").is_file() else Path(tmp) / "demo"
        if data != args.data:
            build_demo(data, seed=0)
        demo_cfg = OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml")
        cfg = PreprocessConfig.coerce(OmegaConf.to_container(demo_cfg.preprocess))
        region_map = RegionMap.from_config("demo")
        cases = load_manifest(data / "train.jsonl", region_map=region_map)
        preprocess_case(cases[0], cfg)  # pay MONAI's import outside the timings
        items = expand_items(cases, region_map)
        weights = item_weights([i.group for i in items], [i.dataset for i in items])
        keys = list(
            RegionSampler([i.region for i in items], weights, num_samples=max(args.patches, args.fly_patches))
        )

        cache = PreprocessCache(Path(tmp) / "cache")
        start = time.perf_counter()
        for case in cases:
            cache.get(case, cfg)
        fill = time.perf_counter() - start

        common = dict(
            cfg=cfg,
            patch_size=tuple(demo_cfg.patch_size),
            max_queries=int(demo_cfg.max_queries),
            label_centered_prob=float(demo_cfg.label_centered_prob),
            region_map=region_map,
        )
        rows = []
        for augment in (False, True):
            aug = OmegaConf.to_container(demo_cfg.augment) if augment else False
            cached = rate(PatchDataset(cases, cache, augment=aug, **common), keys[: args.patches])
            fly = rate(PatchDataset(cases, None, augment=aug, **common), keys[: args.fly_patches])
            rows.append(("cache (memory-mapped)", augment, *cached))
            rows.append(("on the fly (no cache)", augment, *fly))

    print(
        f"# data loading, demo train split: {len(cases)} cases, {len(items)} items, patch {common['patch_size']}"
    )
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), 1 process; cache fill once: {fill:.1f} s "
          f"({fill / len(cases) * 1000:.0f} ms/case)")  # fmt: skip
    print()
    print("| source | augment | patches | seconds | patches/s |")
    print("|---|---|---|---|---|")
    for source, augment, n, seconds in rows:
        print(f"| {source} | {'on' if augment else 'off'} | {n} | {seconds:.2f} | {n / seconds:.1f} |")
    print()
    for a in range(2):
        (_, _, n_c, s_c), (_, _, n_f, s_f) = rows[2 * a], rows[2 * a + 1]
        print(f"cache speed-up, augment {'on' if a else 'off'}: {(n_c / s_c) / (n_f / s_f):.1f}x")


if __name__ == "__main__":
    main()

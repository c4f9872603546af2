"""What each GPU experiment needs per GPU at the size users run: device memory, loader workers, host memory.

    PYTHONPATH=. python scripts/benchmarks/scale.py [--experiments pro nano teacher_pro teacher_nano]
        [--patches 12] [--out FILE.md]

For each experiment as shipped (``python train.py experiment=NAME``):

* **device memory**: :func:`lorkd.memory.training_step_memory` (counted on the meta device, calibrated on
  the H100 rows of RESULTS.md) and its headroom on an 80 GiB card;
* **bytes per sample** as the workers hand them over (``scripts/benchmarks/loader.py``'s
  :func:`measure_loader` on the synthetic 512x512x300 CT) and per prefetch queue (``prefetch_factor`` 2 x
  the micro-batch, per worker);
* **loader patches/s per worker** (one torch thread, as in a DataLoader worker, from the filled cache, in a
  spawned process whose peak RSS is the host memory of one worker — an upper bound: forked workers share
  the parent's pages);
* **the H100 time per sample** of the experiment's step: its FLOPs (``torch.utils.flop_counter`` on the
  meta device, with the shipped micro-batch and activation checkpointing) at the rate the H100 reached on
  the full LoRKD-Pro step that ``gpu_check.py`` measured (545.4 ms, batch 1, 8 prompts, bf16);
* **workers per GPU** to keep up: ceil(1 / (time per sample x patches/s per worker)), and the host memory
  they take (workers x (RSS + queue)).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPERIMENTS = ["pro", "nano", "teacher_pro", "teacher_nano"]
DEVICE_GIB = 80.0
PREFETCH_FACTOR = 2  # torch DataLoader's default, which LoRKDDataModule keeps
# gpu_check.py on an NVIDIA H100 80GB HBM3, bf16 (RESULTS.md): full LoRKD step, SAT-Pro teacher forward +
# LoRKD-Pro student forward, backward and AdamW, one 288x288x96 window, 8 prompts
H100_FULL_STEP_S = 0.5454
H100_FULL_STEP = ("pro", 1, 8)  # (experiment, micro-batch, prompts) of that row


def training_step_flops(cfg: Any, micro_batch: int | None = None, queries: int | None = None, checkpointing: bool | None = None) -> int:
    """FLOPs of one training micro-batch (teacher forward, student forward and backward, recomputation
    included when checkpointing) of the composed experiment ``cfg``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorkd.memory import build_module, largest_expert, meta_batch, set_activation_checkpointing

    module = build_module(cfg)
    if checkpointing is not None:
        set_activation_checkpointing(module, checkpointing)
    data = cfg.data
    batch = meta_batch(
        int(micro_batch or data.batch_size), int(queries or data.max_queries), list(data.patch_size),
        int(cfg.text_encoder.query_dim), largest_expert(cfg, list(cfg.regions.regions)),
    )  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter:
        module.training_step(batch, 0).backward()
    return counter.get_total_flops()


def _worker_figures(data: dict, patches: int, workdir: str) -> tuple[float, float, int]:
    """In a spawned process with one torch thread: (patches/s, bytes per sample at max queries, peak RSS)."""
    torch.set_num_threads(1)
    from scripts.benchmarks.loader import measure_loader

    figures = measure_loader(data, patches=patches, threads=1, workdir=workdir)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return figures.patches_per_s, float(figures.bytes_at_max_queries), rss


@dataclass
class Row:
    experiment: str
    micro_batch: int
    accumulate: int
    checkpointing: bool
    peak_gib: float
    patches_per_s: float
    sample_mb: float
    queue_mb: float  # one worker's prefetch queue
    worker_rss_gib: float
    h100_s_per_sample: float

    @property
    def workers(self) -> int:
        return max(1, math.ceil(1.0 / (self.h100_s_per_sample * self.patches_per_s)))

    @property
    def host_gib(self) -> float:
        return self.workers * (self.worker_rss_gib + self.queue_mb / 1024)


def measure(experiments: Sequence[str], patches: int, workdir: Path) -> list[Row]:
    from omegaconf import OmegaConf

    from lorkd.memory import experiment_config, training_step_memory
    from scripts.benchmarks.loader import measure_loader

    reference = experiment_config(H100_FULL_STEP[0])
    flops_per_s = training_step_flops(
        reference, micro_batch=H100_FULL_STEP[1], queries=H100_FULL_STEP[2], checkpointing=False
    ) / H100_FULL_STEP_S
    loader: dict[str, tuple[float, float, int]] = {}
    rows = []
    context = multiprocessing.get_context("spawn")
    for name in experiments:
        cfg = experiment_config(name)
        data = OmegaConf.to_container(cfg.data, resolve=False)
        data = {k: data[k] for k in ("patch_size", "max_queries", "preprocess", "augment", "image_dtype",
                                     "label_centered_prob", "neg_ratio") if k in data}  # fmt: skip
        key = repr(sorted(data.items()))
        if key not in loader:
            measure_loader(data, patches=1, threads=1, workdir=workdir)  # fills the cache outside the timing
            with context.Pool(1) as pool:
                loader[key] = pool.apply(_worker_figures, (data, patches, str(workdir)))
        rate, sample_bytes, rss = loader[key]
        memory = training_step_memory(cfg)
        micro = int(cfg.data.batch_size)
        seconds = training_step_flops(cfg) / flops_per_s / micro
        rows.append(Row(
            name, micro, int(cfg.trainer.get("accumulate_grad_batches") or 1), bool(memory.meta.get("checkpointing")),
            memory.peak_gib, rate, sample_bytes / 2**20, PREFETCH_FACTOR * micro * sample_bytes / 2**20,
            rss / 2**30, seconds,
        ))  # fmt: skip
    return rows


def table(rows: Sequence[Row]) -> list[str]:
    return [
        "| experiment | micro-batch x accumulation | checkpointing | GPU peak GiB | headroom on 80 GiB "
        "| MB / sample | MB / worker queue | patches/s / worker | H100 s / sample | workers / GPU | host RAM / GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r.experiment} | {r.micro_batch} x {r.accumulate} | {'on' if r.checkpointing else 'off'} "
            f"| {r.peak_gib:.1f} | {DEVICE_GIB - r.peak_gib:.1f} | {r.sample_mb:.1f} | {r.queue_mb:.0f} "
            f"| {r.patches_per_s:.2f} | {r.h100_s_per_sample:.3f} | {r.workers} | {r.host_gib:.1f} |"
            for r in rows
        ],
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS, choices=EXPERIMENTS)
    parser.add_argument("--patches", type=int, default=12, help="patches timed per worker measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the synthetic CT and its cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.experiments, args.patches, args.workdir or Path(tmp))
    lines = [
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"loader: 1 thread per worker, synthetic 512x512x300 CT, {args.patches} patches; GPU time: FLOPs at the "
        f"H100's measured rate on the full LoRKD-Pro step ({1000 * H100_FULL_STEP_S:.1f} ms)",
        "",
        *table(rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

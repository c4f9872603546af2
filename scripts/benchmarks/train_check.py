"""A few real ``Trainer.fit`` steps of a shipped experiment at its real size, with random weights.

``gpu_check.py --train EXPERIMENT`` runs this on a lent GPU (and ``--allow-cpu`` with shrinking overrides in
the tests). It writes, into a work folder:
  * the teacher as an official-shaped SAT vision file with random weights (SAT-Pro for ``pro``, SAT-Nano for
    ``nano``; teacher experiments train SAT itself and need none);
  * a synthetic SAT-DS-like manifest of a few CT-sized cases (loader.py's: int16 CT, 15 abdominal labels);
then composes ``train.yaml`` with ``experiment=EXPERIMENT`` (the shipped batch, accumulation, precision,
workers and augmentation) and fits ``--steps`` optimizer steps on every visible GPU (DDP when there are
several). The text side is the offline MiniLM with SAT's 768-d projection: it is frozen and its queries are
cached, so it changes neither step time nor memory.

Measured after ``--warmup`` optimizer steps: seconds per optimizer step and per sample, the share of the
time spent waiting for batches (fetch, transfer and device augmentation, i.e. outside the training step
hooks), and the peak device memory (CUDA allocator) against the memory model's estimate.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEACHER_BACKBONES = {"pro": "unet_pro", "nano": "unet_nano"}


def write_manifest(folder: Path, cases: int, shape: Sequence[int] = (512, 512, 300)) -> Path:
    """A SAT-DS-like jsonl of ``cases`` synthetic CT cases (``loader.synthetic_ct_case``: int16 CT at
    0.8x0.8x1.5 mm, 15 abdominal labels in one label map), each in its own sub-folder of ``folder``."""
    from scripts.benchmarks.loader import synthetic_ct_case

    lines = []
    for i in range(cases):
        (folder / f"ct{i}").mkdir(parents=True, exist_ok=True)
        case = synthetic_ct_case(folder / f"ct{i}", size=tuple(shape))
        lines.append(json.dumps({
            "image": f"ct{i}/{case.image.name}", "mask": f"ct{i}/{case.mask.name}", "label": case.labels,
            "modality": "ct", "dataset": "SyntheticAbdomenCT", "id": f"ct{i}",
        }))  # fmt: skip
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_teacher(folder: Path, backbone: str, query_dim: int = 768) -> Path:
    """A random-weight SAT teacher of ``backbone`` (configs/backbone) in the official vision layout."""
    import yaml

    from lorkd.checkpoints.sat_official import official_vision_state
    from lorkd.models.sat import SAT
    from lorkd.utils import CONFIG_DIR

    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text())
    torch.manual_seed(0)
    model = SAT(**spec, query_dim=query_dim, decoder_layers=6, decoder_heads=8, decoder_ffn=2048, dropout=0.1)
    path = folder / f"SAT_{backbone}.pth"
    torch.save({"model_state_dict": official_vision_state(model)}, path)
    return path


class StepTimer(pl.Callback):
    """Per micro-batch after ``warmup_batches``: seconds inside the training step hooks, seconds waiting before
    them (fetch, transfer, device augmentation), and the peak CUDA memory; rank 0 writes them to ``out`` (json)."""

    def __init__(self, out: str, warmup_batches: int) -> None:
        self.out, self.warmup = out, int(warmup_batches)
        self.step: list[float] = []
        self.wait: list[float] = []
        self.start = self.end = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = self._now()
        if batch_idx == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if batch_idx > self.warmup and self.end is not None:
            self.wait.append(self.start - self.end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = self._now()
        if batch_idx >= self.warmup:
            self.step.append(self.end - self.start)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
            Path(self.out).write_text(json.dumps({"step": self.step, "wait": self.wait, "peak_bytes": peak}))


def compose_check(
    experiment: str, work: Path, teacher: Path | None, overrides: Sequence[str], steps: int, warmup: int, cpu: bool
):
    """``train.yaml`` with the experiment as shipped, pointed at the work folder's data and ``teacher``, its run
    in ``work/experiment``, and the step timer added to its callbacks."""
    from hydra import compose, initialize_config_dir

    from lorkd.utils import CONFIG_DIR, register_resolvers

    args = [
        f"experiment={experiment}",
        "text_encoder=minilm",
        f"data.train_manifest={work / 'data' / 'train.jsonl'}",
        "data.val_manifest=null",
        "+trainer.limit_val_batches=0",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.output_dir={work / experiment}",
        "data.warm_cache=true",
        f"trainer.max_steps={steps}",
        "~callbacks.model_checkpoint",
        "~callbacks.progress_bar",
        "logger=csv",
        "+callbacks.step_timer._target_=scripts.benchmarks.train_check.StepTimer",
        f"+callbacks.step_timer.out={work / experiment / 'timings.json'}",
    ]
    if teacher is not None:
        args.append(f"teacher.checkpoint={teacher}")
    if cpu:
        args += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1", "trainer.benchmark=false"]
    elif torch.cuda.device_count() > 1:
        args += ["trainer=ddp", f"trainer.devices={torch.cuda.device_count()}"]
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*args, *overrides], return_hydra_config=True)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    with open_dict(cfg):
        cfg.callbacks.step_timer.warmup_batches = warmup * accumulate
    return cfg


def prepare(work: Path, cases: int, shape: Sequence[int], backbone: str | None) -> None:
    """Data and the teacher of ``backbone`` into ``work``, once (later experiments and DDP's re-launched ranks
    find them there)."""
    if not (work / "data" / "train.jsonl").is_file():
        write_manifest(work / "data", cases, shape)
    if backbone and not (work / f"SAT_{backbone}.pth").is_file():
        write_teacher(work, backbone)


def run_check(
    experiment: str,
    steps: int = 6,
    warmup: int = 2,
    cases: int = 3,
    shape: Sequence[int] = (512, 512, 300),
    overrides: Sequence[str] = (),
    teacher_backbone: str | None = None,
    allow_cpu: bool = False,
    work: Path | None = None,
) -> dict | None:
    """Fit ``steps`` optimizer steps of ``experiment`` (the first ``warmup`` untimed) in ``work/experiment``
    (``work`` default: a new temporary folder); returns the figures on rank 0 (None on the other ranks).
    ``teacher_backbone`` replaces the experiment's teacher (SAT-Pro for pro, SAT-Nano for nano), e.g. in tests."""
    from hydra.core.hydra_config import HydraConfig

    from lorkd.training import train

    cpu = not torch.cuda.is_available()
    if cpu and not allow_cpu:
        raise SystemExit("gpu_check.py --train needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    # DDP re-runs this script in each rank: the work folder travels in the environment
    work = Path(os.environ.setdefault("LORKD_TRAIN_CHECK_DIR", str(work or tempfile.mkdtemp(prefix="lorkd-train-check-"))))
    backbone = (teacher_backbone or TEACHER_BACKBONES[experiment]) if experiment in TEACHER_BACKBONES else None
    rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if rank_zero:
        prepare(work, cases, shape, backbone)
    teacher = work / f"SAT_{backbone}.pth" if backbone else None
    cfg = compose_check(experiment, work, teacher, overrides, steps, warmup, cpu)
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    if not rank_zero:
        return None
    timings = json.loads((work / experiment / "timings.json").read_text())
    micro = int(cfg.data.batch_size)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    step, wait = timings["step"], timings["wait"]
    per_step = statistics.median(step) * accumulate if step else float("nan")
    return {
        "experiment": experiment,
        "device": "cpu" if cpu else torch.cuda.get_device_name(),
        "devices": 1 if cpu else max(torch.cuda.device_count(), 1),
        "micro_batch": micro,
        "accumulate": accumulate,
        "patch": list(cfg.data.patch_size),
        "queries": int(cfg.data.max_queries),
        "precision": str(cfg.trainer.precision),
        "micro_batches_timed": len(step),
        "seconds_per_step": per_step,
        "seconds_per_sample": per_step / (micro * accumulate),
        "data_wait_share": sum(wait) / max(sum(wait) + sum(step), 1e-9),
        "peak_gib": timings["peak_bytes"] / 2**30,
        "estimate_gib": estimated_peak_gib(cfg),
    }


def estimated_peak_gib(cfg) -> float:
    """The memory model's peak for this composed config (GiB)."""
    from lorkd.memory import training_step_memory

    return training_step_memory(cfg).peak_gib


def table(results: Sequence[dict]) -> list[str]:
    """Markdown lines of ``run_check`` results."""
    lines = [
        "| experiment | GPUs | micro-batch x accumulation | s / optimizer step | s / sample | waiting for data "
        "| peak GiB | model GiB | measured / model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["peak_gib"] / r["estimate_gib"] if r["estimate_gib"] else float("nan")
        lines.append(
            f"| {r['experiment']} | {r['devices']} | {r['micro_batch']} x {r['accumulate']} | {r['seconds_per_step']:.2f} "
            f"| {r['seconds_per_sample']:.3f} | {100 * r['data_wait_share']:.0f}% | {r['peak_gib']:.2f} "
            f"| {r['estimate_gib']:.2f} | {ratio:.2f} |"
        )
    return lines

"""What SATModule and LoRKDModule share: prompt queries, optimiser and schedule, patch-Dice validation,
and the project metadata stored in every checkpoint (:mod:`lorkd.checkpoints.schema`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lorkd.checkpoints import schema
from lorkd.checkpoints.schema import CheckpointMeta, TextHead
from lorkd.losses import hard_dice
from lorkd.models.text import TextEncoder
from lorkd.prompts import PromptBank
from lorkd.regions import RegionMap

RNG_KEY = "rng_states"


def rng_states() -> dict[str, Any]:
    """torch (CPU, CUDA), numpy and Python global RNG states, in types that load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class PromptedSegmentationModule(pl.LightningModule):
    """Base class: subclasses implement ``segment(batch, queries) -> logits`` for validation."""

    checkpoint_kind = ""

    def __init__(
        self,
        text_encoder: TextEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int,
        total_steps: int,
        prompt_cache_dir: str | Path | None = None,
        region_map: RegionMap | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.prompts = PromptBank(text_encoder, prompt_cache_dir)
        self.optimizer_factory = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.region_map = region_map
        self._val_sums: dict[str, torch.Tensor] = {}

    # ---- prompts -----------------------------------------------------------------------------------
    def batch_queries(self, labels: Sequence[Sequence[str]], modalities: Sequence[str], n: int) -> torch.Tensor:
        """(B, n, D) queries for per-sample label lists (zero vectors at padded positions)."""
        flat = [lab for labs in labels for lab in labs]
        mods = [m for labs, m in zip(labels, modalities) for _ in labs]
        queries = torch.zeros(len(labels), n, self.text_encoder.query_dim, device=self.device)
        if not flat:
            return queries
        vectors = self.prompts.queries(flat, mods)
        start = 0
        for b, labs in enumerate(labels):
            queries[b, : len(labs)] = vectors[start : start + len(labs)]
            start += len(labs)
        return queries

    def queries_for(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.batch_queries(batch["labels"], batch["modality"], batch["masks"].shape[1])

    # ---- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation: patch Dice per region ---------------------------------------------------------
    def region_names(self) -> list[str]:
        return self.region_map.regions if self.region_map is not None else []

    def accumulate_dice(self, name: str, dice: torch.Tensor, query_mask: torch.Tensor, region: torch.Tensor) -> None:
        """Add per-(sample, query) Dice to per-region sums; index R (last) holds all regions together."""
        n_regions = len(self.region_names())
        if name not in self._val_sums:
            self._val_sums[name] = torch.zeros(2, n_regions + 1, device=self.device, dtype=torch.float64)
        sums = self._val_sums[name]
        valid = query_mask.bool()
        per_sample = (dice * valid).sum(1).double()
        counts = valid.sum(1).double()
        idx = region.clamp(min=-1).long().to(self.device)
        known = idx >= 0
        sums[0].index_add_(0, idx[known], per_sample[known])
        sums[1].index_add_(0, idx[known], counts[known])
        sums[0, -1] += per_sample.sum()
        sums[1, -1] += counts.sum()

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        names = self.region_names()
        for name, sums in self._val_sums.items():
            total = self.trainer.strategy.reduce(sums, reduce_op="sum")
            means = total[0] / total[1].clamp_min(1)
            self.log(f"val/{name}", means[-1].float(), sync_dist=False, rank_zero_only=False)
            for r, region in enumerate(names):
                if total[1, r] > 0:
                    self.log(f"val/{name}/{region}", means[r].float(), sync_dist=False)

    def validation_dice(self, batch: dict[str, Any], logits: torch.Tensor, name: str = "dice") -> None:
        self.accumulate_dice(name, hard_dice(logits, batch["masks"]), batch["query_mask"], batch["region"])

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> CheckpointMeta:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        describe = getattr(datamodule, "describe", None)
        return CheckpointMeta(
            kind=self.checkpoint_kind,
            text_encoder=TextHead.of(self.text_encoder),
            prompt_bank=self.prompts.state_dict(),
            region_map=self.region_map.to_dict() if self.region_map is not None else None,
            data=describe() if callable(describe) else {},
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        schema.write(checkpoint, self.checkpoint_metadata())
        checkpoint[RNG_KEY] = rng_states()  # dropout masks of a resumed run continue the same stream

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = schema.read(checkpoint, "the checkpoint to resume")
        if meta is not None:
            self.prompts.load_state_dict(meta.prompt_bank)
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])

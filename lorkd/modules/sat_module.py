"""SATModule: train a universal, text-prompted SAT teacher (Dice + BCE over valid queries, optional deep supervision)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lorkd.checkpoints.schema import CheckpointMeta
from lorkd.losses import deep_supervision_loss
from lorkd.models.sat import SAT
from lorkd.models.text import TextEncoder
from lorkd.modules.base import PromptedSegmentationModule
from lorkd.regions import RegionMap


class SATModule(PromptedSegmentationModule):
    checkpoint_kind = "sat"

    def __init__(
        self,
        net: SAT,
        text_encoder: TextEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 20000,
        total_steps: int = 200000,
        prompt_cache_dir: str | Path | None = None,
        train_text_head: bool = False,
        region_map: RegionMap | None = None,
    ) -> None:
        super().__init__(text_encoder, optimizer, warmup_steps, total_steps, prompt_cache_dir, region_map)
        self.net = net
        # SAT freezes the language model and the projection; only the modality embedding trains
        text_encoder.projection_layer.requires_grad_(train_text_head)

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.net(image, queries)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.net(batch["image"], self.queries_for(batch), return_aux=True)
        loss, parts = deep_supervision_loss([out.logits, *out.aux_logits], batch["masks"], batch["query_mask"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_dice(batch, self.net(batch["image"], self.queries_for(batch)))

    def checkpoint_metadata(self) -> CheckpointMeta:
        return replace(super().checkpoint_metadata(), net=dict(self.net.config))

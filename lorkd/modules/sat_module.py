"""SATModule: train a universal, text-prompted SAT teacher (Dice + BCE over valid queries, optional deep supervision)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        spread_label_queries: bool = False,
    ) -> None:
        """``spread_label_queries``: before a fresh run (not a resume) starts, initialise the trainable text
        head so that the training labels' queries start apart (:meth:`TextEncoder.spread_labels`)."""
        super().__init__(text_encoder, optimizer, warmup_steps, total_steps, prompt_cache_dir, region_map)
        self.net = net
        # SAT freezes the language model and the projection; only the modality embedding trains
        text_encoder.projection_layer.requires_grad_(train_text_head)
        if spread_label_queries and not train_text_head:
            raise ValueError("spread_label_queries needs train_text_head=true (a frozen head keeps its weights)")
        self.spread_label_queries = spread_label_queries

    def spread_queries(self, labels: Sequence[str]) -> int:
        """Whiten the first projection layer over ``labels``' text embeddings; returns the rows set."""
        return self.text_encoder.spread_labels(self.prompts.text_embeddings(sorted(set(labels))))

    def setup(self, stage: str) -> None:
        # runs before Lightning restores a checkpoint, so a resumed run keeps its trained head
        if stage == "fit" and self.spread_label_queries:
            self.spread_queries([lab for case in self.trainer.datamodule.cases_of("train") for lab in case.labels])

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

"""SAT: U-Net backbone + latent fusion + query decoder + mask head (SAT's ``Maskformer``).

``logits[b, n] = <per-voxel embedding[b], mask embedding[b, n]>`` -> (B, N, H, W, D); sigmoid outside.
Attribute names follow SAT's checkpoints: ``backbone``, ``projection_layer``, ``transformer_decoder``,
``mask_embed_proj``, ``mid_mask_embed_proj``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorkd.models.decoder import QueryDecoder
from lorkd.models.positional import positional_encoding_3d
from lorkd.models.unet import PlainConvUNet


def window_size(window: Sequence[int], divisor: int) -> tuple[int, int, int]:
    """``window`` rounded up, per axis, to a multiple of the network's ``size_divisor``."""
    if len(window) != 3 or min(int(w) for w in window) <= 0:
        raise ValueError(f"window must be 3 positive sizes, got {list(window)}")
    return tuple(int(math.ceil(int(w) / divisor) * divisor) for w in window)  # type: ignore[return-value]


def _mlp(d_in: int, d_hidden: int, d_out: int, final_act: bool = True) -> nn.Sequential:
    """Linear-GELU-Linear[-GELU] (SAT's projection heads; keys ``0`` and ``2``)."""
    layers = [nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)]
    return nn.Sequential(*layers, nn.GELU()) if final_act else nn.Sequential(*layers)


def _plain_ints(value: int | Sequence[int] | None) -> int | list[int] | None:
    """An int, a sequence of ints (e.g. Hydra's ListConfig) as a plain list, or None: what a checkpoint
    loaded with ``weights_only=True`` can hold."""
    if value is None or isinstance(value, int):
        return value
    return [int(v) for v in value]


@dataclass
class ImageFeatures:
    """What the decoder needs from one backbone pass (reused across query chunks)."""

    per_voxel: list[torch.Tensor]  # (B, C_i, H_i, W_i, D_i): full resolution, then /2, /4, /8 with deep supervision
    memory: torch.Tensor  # (B, L, query_dim) fused latent tokens, ``(h w d)`` order
    pos: torch.Tensor  # (1, L, query_dim) positional encoding (added to keys only)
    latent: torch.Tensor  # (B, C_fused, h, w, d) pooled multi-scale features before projection


@dataclass
class SATOutput:
    logits: torch.Tensor  # (B, N, H, W, D)
    aux_logits: list[torch.Tensor]  # deep-supervision logits at /2, /4, /8 (empty without DS)
    memory: torch.Tensor  # (B, L, query_dim) fused latent tokens


class SAT(nn.Module):
    def __init__(
        self,
        features: Sequence[int],
        strides: Sequence[int],
        n_convs: int = 2,
        n_convs_decoder: int | None = None,
        in_channels: int = 3,
        query_dim: int = 768,
        proj_hidden: int = 768,
        mask_hidden: int = 256,
        decoder_layers: int = 6,
        decoder_heads: int = 8,
        decoder_ffn: int = 2048,
        dropout: float = 0.1,
        latent_stride: int = 32,
        deep_supervision: bool = False,
        ds_hidden: Sequence[int] = (256, 384, 512),
        mask_head_act: bool = True,
        checkpoint_stages: bool = False,
    ) -> None:
        """``mask_head_act=False`` drops the mask heads' final GELU (SAT has it): the mask embedding is then
        free in sign, so a voxel's logit (its non-negative LeakyReLU features times the embedding) can
        be negative without huge features. Same keys; a demo knob. ``checkpoint_stages``: activation
        checkpointing of the U-Net's stages in training (a training knob: not part of ``config``)."""
        super().__init__()
        self.config: dict[str, Any] = {
            "features": list(features), "strides": list(strides), "n_convs": _plain_ints(n_convs),
            "n_convs_decoder": _plain_ints(n_convs_decoder), "in_channels": in_channels, "query_dim": query_dim,
            "proj_hidden": proj_hidden, "mask_hidden": mask_hidden, "decoder_layers": decoder_layers,
            "decoder_heads": decoder_heads, "decoder_ffn": decoder_ffn, "dropout": dropout,
            "latent_stride": latent_stride, "deep_supervision": deep_supervision, "ds_hidden": list(ds_hidden),
            "mask_head_act": mask_head_act,
        }  # fmt: skip
        self.backbone = PlainConvUNet(features, strides, n_convs, n_convs_decoder, in_channels, checkpoint_stages)
        self.pool_kernels = []
        for cum in self.backbone.stage_strides():
            if latent_stride % cum:
                raise ValueError(f"latent_stride {latent_stride} must be a multiple of every stage stride {cum}")
            self.pool_kernels.append(latent_stride // cum)
        self.latent_stride = latent_stride
        self.size_divisor = max(latent_stride, self.backbone.total_stride)
        self.query_dim = query_dim
        self.projection_layer = _mlp(sum(features), proj_hidden, query_dim)
        self.transformer_decoder = QueryDecoder(query_dim, decoder_heads, decoder_layers, decoder_ffn, dropout)
        self.mask_embed_proj = _mlp(query_dim, mask_hidden, features[0], mask_head_act)
        self.deep_supervision = deep_supervision
        if deep_supervision:
            n_ds = min(3, len(features) - 2)
            self.mid_mask_embed_proj = nn.ModuleList(
                _mlp(query_dim, ds_hidden[i], features[i + 1], mask_head_act) for i in range(n_ds)
            )
        self._pos_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def check_input(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 5:
            raise ValueError(f"expected an image (B, C, H, W, D), got shape {tuple(image.shape)}")
        bad = [s for s in image.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(image.shape[2:])} must be a multiple of {self.size_divisor} on every axis"
            )
        c_in = self.backbone.in_channels
        if image.shape[1] == 1 and c_in > 1:
            image = image.expand(-1, c_in, -1, -1, -1)  # SAT repeats the single channel
        elif image.shape[1] != c_in:
            raise ValueError(f"expected 1 or {c_in} input channels, got {image.shape[1]}")
        return image

    def positional(self, grid: tuple[int, int, int], ref: torch.Tensor) -> torch.Tensor:
        if grid not in self._pos_cache:
            self._pos_cache[grid] = positional_encoding_3d(grid, self.query_dim)
        return self._pos_cache[grid].to(device=ref.device, dtype=ref.dtype)[None]

    def encode(self, image: torch.Tensor) -> ImageFeatures:
        out = self.backbone(self.check_input(image), pool=self.pool_kernels)
        latent = torch.cat(out.pooled, dim=1)
        tokens = latent.flatten(2).transpose(1, 2)  # (B, h*w*d, C), d fastest
        memory = self.projection_layer(tokens)
        n_maps = 1 + (len(self.mid_mask_embed_proj) if self.deep_supervision else 0)
        return ImageFeatures(
            per_voxel=out.decoded[:n_maps],
            memory=memory,
            pos=self.positional(tuple(latent.shape[2:]), memory),
            latent=latent,
        )

    def decode(self, features: ImageFeatures, queries: torch.Tensor) -> list[torch.Tensor]:
        """Logits for ``queries`` (N, D) or (B, N, D): full resolution first, then deep-supervision scales."""
        b = features.memory.shape[0]
        if queries.ndim == 2:
            queries = queries[None].expand(b, -1, -1)
        decoded = self.transformer_decoder(queries.to(features.memory.dtype), features.memory, features.pos)
        heads = [self.mask_embed_proj]
        if self.deep_supervision:
            heads += list(self.mid_mask_embed_proj)
        return [
            torch.einsum("bchwd,bnc->bnhwd", voxels, head(decoded))
            for voxels, head in zip(features.per_voxel, heads)
        ]

    def forward(self, image: torch.Tensor, queries: torch.Tensor, return_aux: bool = False):
        """``image`` (B, 1|C, H, W, D), ``queries`` (N, D) or (B, N, D) -> logits (B, N, H, W, D)."""
        features = self.encode(image)
        logits = self.decode(features, queries)
        if return_aux:
            return SATOutput(logits=logits[0], aux_logits=logits[1:], memory=features.memory)
        return logits[0]

"""SAT's cross-attention-only query decoder (DETR-derived, pre-norm, no self-attention).

Queries never attend to each other, so a label's mask does not depend on the other prompts.
q/k/v/out are explicit ``nn.Linear`` layers (SAT stores one ``in_proj_weight``; the importer splits it)
so peft can target them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"query dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        b, h, n, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * dh))


class QueryDecoderLayer(nn.Module):
    """``t += Drop(Attn(norm2(t), memory + pos, memory)); t += Drop(W2 ReLU(W1 norm3(t)))``."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = CrossAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        # SAT builds norm1 for a self-attention it never runs: kept (frozen) so checkpoints and the
        # parameter count match the original.
        self.norm1 = nn.LayerNorm(dim)
        self.norm1.requires_grad_(False)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tgt = tgt + self.dropout(self.multihead_attn(self.norm2(tgt), memory + pos, memory))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout(ffn)


class QueryDecoder(nn.Module):
    """``layers`` x QueryDecoderLayer, then a final LayerNorm. Batch-first tensors."""

    def __init__(self, dim: int = 768, heads: int = 8, layers: int = 6, ffn_dim: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """queries (B, N, D), memory (B, L, D), pos (1|B, L, D) -> (B, N, D)."""
        out = queries
        for layer in self.layers:
            out = layer(out, memory, pos)
        return self.norm(out)

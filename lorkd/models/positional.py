"""Fixed 3-D sinusoidal positional encoding, as ``positional_encodings`` 6.0.1 ``PositionalEncoding3D``."""

from __future__ import annotations

import math

import torch


def _axis_encoding(n: int, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    # interleave: [sin f0, cos f0, sin f1, cos f1, ...]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)


def positional_encoding_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """(H*W*D, dim) encoding, tokens in ``(h w d)`` order (d fastest).

    Channels [0:c] encode h, [c:2c] w, [2c:3c] d with ``c = 2*ceil(dim/6)``; truncated to ``dim``.
    """
    c = 2 * math.ceil(dim / 6)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c, 2, dtype=torch.float32) / c))
    h, w, d = grid
    eh, ew, ed = (_axis_encoding(n, inv_freq) for n in (h, w, d))
    enc = torch.zeros(h, w, d, 3 * c)
    enc[..., :c] = eh[:, None, None, :]
    enc[..., c : 2 * c] = ew[None, :, None, :]
    enc[..., 2 * c :] = ed[None, None, :, :]
    return enc[..., :dim].reshape(h * w * d, dim)

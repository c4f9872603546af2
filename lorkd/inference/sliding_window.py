"""Sliding-window inference of text-prompted logits with MONAI, one image encoding per window.

:class:`WindowModel` is the predictor MONAI calls on each window batch: it encodes the windows once
(through the chosen region expert), decodes at most ``max_queries`` prompts per pass and returns
sigmoid probabilities. :func:`sliding_window_probabilities` blends them over the volume with
MONAI's ``sliding_window_inference`` (gaussian weights; inputs smaller than the window are padded
and the result cropped back).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

ProgressFn = Callable[[int], None]  # called with the number of windows just processed


def count_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` visits on an image of ``shape``."""
    total = 1
    for size, roi in zip(shape, window):
        if size > roi:
            step = max(int(roi * (1 - overlap)), 1)
            total *= math.ceil((size - roi) / step) + 1
    return total


def route(
    model: torch.nn.Module, region_index: torch.Tensor, per_sample_weights: bool | None = None
) -> contextlib.AbstractContextManager:
    """:func:`lorkd.experts.route`, imported on first use: peft is loaded only for networks with experts."""
    from lorkd.experts import route as route_experts

    return route_experts(model, region_index, per_sample_weights)


def autocast_dtype() -> torch.dtype:
    """bfloat16 where the GPU supports it (no overflow), else float16 (SAT's choice)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class WindowModel:
    """Window batch (B, 1, *window) -> probabilities (B, N, *window) for ``queries`` (N, D).

    ``expert``: route every window through that expert (-1: the shared base; None: no routing, for
    models without experts). ``amp``: autocast on CUDA.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        queries: torch.Tensor,
        expert: int | None = None,
        max_queries: int = 16,
        amp: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.net = net
        self.queries = queries
        self.expert = expert
        self.max_queries = int(max_queries)
        self.amp = amp
        self.progress = progress

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=autocast_dtype())
        return contextlib.nullcontext()

    def _route(self, batch: int) -> contextlib.AbstractContextManager:
        if self.expert is None:
            return contextlib.nullcontext()
        index = torch.full((batch,), self.expert, dtype=torch.long)
        return route(self.net.backbone, index)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        b, n = windows.shape[0], self.queries.shape[0]
        direct = getattr(self.net, "probabilities", None)  # an ONNX expert: the whole network in one call
        if direct is not None:
            chunks = [direct(windows, self.queries[s : s + self.max_queries]) for s in range(0, n, self.max_queries)]
            if self.progress is not None:
                self.progress(b)
            return torch.cat(chunks, dim=1)
        with self._autocast(windows.device):
            with self._route(b):
                features = self.net.encode(windows)
            if len(features.per_voxel) > 1:  # deep supervision: only the full-resolution head is needed
                features = replace(features, per_voxel=features.per_voxel[:1])
            if n <= self.max_queries:
                out = torch.sigmoid(self.net.decode(features, self.queries)[0].float())
            else:
                out = torch.empty((b, n, *windows.shape[2:]), dtype=torch.float32, device=windows.device)
                for start in range(0, n, self.max_queries):
                    logits = self.net.decode(features, self.queries[start : start + self.max_queries])[0]
                    out[:, start : start + logits.shape[1]] = torch.sigmoid(logits.float())
        if self.progress is not None:
            self.progress(b)
        return out


def sliding_window_probabilities(
    image: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "cpu",
    stitch_device: torch.device | str = "cpu",
    cval: float = 0.0,
) -> torch.Tensor:
    """Blend ``model`` over ``image`` (1, 1, X, Y, Z) -> (N, X, Y, Z) float32 on ``stitch_device``.

    An image smaller than the window is padded with ``cval`` (the image's background value, so that
    the network sees background there, not 0: the normalised scan's mean intensity).

    Windows are cut from ``image`` where it lives (keep it on the CPU for large volumes), run on
    ``device`` and accumulated with gaussian weights on ``stitch_device``.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected an image (1, 1, X, Y, Z), got {tuple(image.shape)}")
    out = sliding_window_inference(
        image,
        roi_size=tuple(int(w) for w in window),
        sw_batch_size=int(sw_batch_size),
        predictor=model,
        overlap=float(overlap),
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=float(cval),
        sw_device=torch.device(device),
        device=torch.device(stitch_device),
    )
    return out[0]

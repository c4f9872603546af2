"""Sliding-window inference of text-prompted logits, one image encoding per window.

:class:`WindowModel` is the predictor MONAI calls on each window batch: it encodes the windows once
(through the chosen region expert), decodes at most ``max_queries`` prompts per pass and returns
sigmoid probabilities. :func:`sliding_window_probabilities` blends them over the volume as MONAI's
``sliding_window_inference`` does (gaussian weights; inputs smaller than the window are padded and
the result cropped back), without importing MONAI (1-3 s of start-up).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

ProgressFn = Callable[[int], None]  # called with the number of windows just processed


def count_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Number of windows :func:`sliding_window_probabilities` visits on an image of ``shape``."""
    return math.prod(len(window_starts(max(s, w), w, overlap)) for s, w in zip(shape, window))


def route(
    model: torch.nn.Module, region_index: torch.Tensor, per_sample_weights: bool | None = None
) -> contextlib.AbstractContextManager:
    """:func:`lorkd.experts.route`, imported on first use: peft is loaded only for networks with experts."""
    from lorkd.experts import route as route_experts

    return route_experts(model, region_index, per_sample_weights)


# CPU windows of at least this many voxels run one per forward: about as fast per window as two at a
# time (0.88-1.04x from 128x128x32 up; 1.04x for the Nano student at 288x288x96) for about half the peak
# memory (6.6 against 13.1 GB there); smaller ones run two at a time, as one takes a slower conv path
# (2.0x at 64x64x32). Measured by scripts/benchmarks/network.py --batch-sweep (RESULTS.md, eighth round).
CPU_SINGLE_WINDOW_VOXELS = 2**19


def default_sw_batch_size(device: torch.device, window: Sequence[int]) -> int:
    """Windows per forward when none is asked for: on the CPU 1 for windows of at least
    :data:`CPU_SINGLE_WINDOW_VOXELS` voxels, else 2; 2 on GPUs."""
    if device.type == "cpu" and math.prod(window) >= CPU_SINGLE_WINDOW_VOXELS:
        return 1
    return 2


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
        direct = getattr(self.net, "probabilities", None)  # an ONNX/OpenVINO expert: the whole network in one call
        if direct is not None:  # every prompt at once: a pass per max_queries prompts would encode the windows again
            out = direct(windows, self.queries)
            if self.progress is not None:
                self.progress(b)
            return out
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

    def release_memory(self) -> None:
        """Free what the network holds between calls (an OpenVINO expert's buffers); nothing for torch's."""
        release = getattr(self.net, "release_memory", None)
        if release is not None:
            release()


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of ``size`` >= ``window`` voxels (MONAI's
    ``dense_patch_slices``: step ``int(window * (1 - overlap))``, the last window flush with the end)."""
    step = window if size == window else max(int(window * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / step)) if d * step + window >= size) + 1
    return [min(d * step, size - window) for d in range(count)]


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Window importance map: a separable gaussian of sigma ``sigma_scale`` x the window size per axis,
    clamped below at max(min, 1e-3) (MONAI's ``compute_importance_map(mode="gaussian")``), float32."""
    weights: torch.Tensor | None = None
    for i, size in enumerate(window):
        x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x**2 / (-2 * (size * sigma_scale) ** 2))
        weights = x if weights is None else weights.unsqueeze(-1) * x[(None,) * i]
    assert weights is not None, "a window has at least one axis"
    return torch.clamp_(weights, min=max(torch.min(weights).item(), 1e-3))


def sliding_window_probabilities(
    image: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "cpu",
    stitch_device: torch.device | str = "cpu",
    cval: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blend ``model`` over ``image`` (1, 1, X, Y, Z) -> (N, X, Y, Z) float32 on ``stitch_device``, or into
    ``out``: a zero (N, X, Y, Z) float32 tensor (a view of a larger one, e.g.) that is returned.

    An image smaller than the window is padded with ``cval`` (the image's background value, so that
    the network sees background there, not 0: the normalised scan's mean intensity) and the result
    cropped back.

    Windows are cut from ``image`` where it lives (keep it on the CPU for large volumes), run on
    ``device`` in batches of ``sw_batch_size`` and accumulated with gaussian weights into one output and
    one weight map on ``stitch_device``, divided in place at the end. Same windows, batches, weights and
    arithmetic as MONAI's ``sliding_window_inference(mode="gaussian", sigma_scale=0.125)``.
    ``model.release_memory()``, where it has one, is called after the last window.
    """
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected an image (1, 1, X, Y, Z), got {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = tuple(int(w) for w in window)
    size = tuple(int(s) for s in image.shape[2:])
    if out is not None and tuple(out.shape[1:]) != size:
        raise ValueError(f"out must be (N, {', '.join(map(str, size))}) like the image, got {tuple(out.shape)}")
    pad = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2) for s, w in zip(size, window)]
    if any(any(p) for p in pad):
        flat = [v for p in reversed(pad) for v in p]  # F.pad takes the last axis first
        image = torch.nn.functional.pad(image, flat, mode="constant", value=float(cval))
    padded = tuple(int(s) for s in image.shape[2:])
    starts = [window_starts(s, w, overlap) for s, w in zip(padded, window)]
    boxes = [
        tuple(slice(o, o + w) for o, w in zip(corner, window))
        for corner in ((a, b, c) for a in starts[0] for b in starts[1] for c in starts[2])
    ]
    device, stitch_device = torch.device(device), torch.device(stitch_device)
    weights = gaussian_weights(window).to(device=device, dtype=image.dtype)
    weights_out = weights.to(stitch_device)
    unpadded = padded == size and out is not None and out.device == stitch_device
    output: torch.Tensor | None = out if unpadded else None  # blended in place
    norm = torch.zeros(padded, dtype=image.dtype, device=stitch_device)
    for box in boxes:
        norm[box] += weights_out
    for first in range(0, len(boxes), int(sw_batch_size)):
        batch = boxes[first : first + int(sw_batch_size)]
        windows = torch.cat([image[(slice(0, 1), slice(None), *box)] for box in batch]).to(device)
        probs = model(windows)
        probs *= weights
        probs = probs.to(stitch_device)
        if output is None:
            output = torch.zeros((probs.shape[1], *padded), dtype=image.dtype, device=stitch_device)
        for box, p in zip(batch, probs):
            output[(slice(None), *box)] += p
        del windows, probs, p  # not held while the next batch runs (the network's peak)
    release = getattr(model, "release_memory", None)  # buffers a network keeps between calls (OpenVINO's: GBs)
    if release is not None:
        release()  # freed before the blend's end and the caller's crop and copy
    assert output is not None  # at least one window
    output /= norm
    del norm
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad, size))
    if output is out:
        return out
    return output[(slice(None), *crop)] if out is None else out.copy_(output[(slice(None), *crop)])

"""SAT-compatible PlainConvUNet (nnU-Net topology) whose ``state_dict`` follows SAT's checkpoints.

Keys: ``encoder.stages.{s}.0.convs.{i}.{conv,norm}.*``, ``decoder.stages.{s}.convs.{i}.{conv,norm}.*``,
``decoder.transpconvs.{s}.*``. SAT's checkpoints also hold ``all_modules.{0,1}`` aliases of the
same tensors; we register each module once (the importer explains the aliases).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class ConvNormAct(nn.Module):
    """Conv3d 3x3x3 (bias) -> InstanceNorm3d(affine) -> LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True)
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvs(nn.Module):
    """``n`` ConvNormAct units; the first one carries the stage's stride."""

    def __init__(self, n: int, in_channels: int, out_channels: int, first_stride: int = 1) -> None:
        super().__init__()
        units = [ConvNormAct(in_channels, out_channels, first_stride)]
        units += [ConvNormAct(out_channels, out_channels) for _ in range(n - 1)]
        self.convs = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, features: Sequence[int], strides: Sequence[int], n_convs: Sequence[int]) -> None:
        super().__init__()
        stages, c_in = [], in_channels
        for c_out, stride, n in zip(features, strides, n_convs, strict=True):
            # SAT wraps each stage in an nn.Sequential (slot for an optional pooling op): ``stages.{s}.0``
            stages.append(nn.Sequential(StackedConvs(n, c_in, c_out, stride)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = recomputed(stage, stage, x) if checkpointed else stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Bottom-up: ConvTranspose3d(k=s=stride) -> concat(upsampled, skip) -> stacked convs."""

    def __init__(self, features: Sequence[int], strides: Sequence[int], n_convs: Sequence[int]) -> None:
        super().__init__()
        transp, stages = [], []
        for s in range(len(features) - 1, 0, -1):
            c_below, c_skip = features[s], features[s - 1]
            transp.append(nn.ConvTranspose3d(c_below, c_skip, kernel_size=strides[s], stride=strides[s], bias=True))
            stages.append(StackedConvs(n_convs[s - 1], 2 * c_skip, c_skip))
        self.transpconvs = nn.ModuleList(transp)
        self.stages = nn.ModuleList(stages)

    def forward(self, skips: list[torch.Tensor], release: bool = False, checkpointed: bool = False) -> list[torch.Tensor]:
        """Returns the decoder stage outputs, largest (full resolution) first. ``release``: pop each skip
        off ``skips`` as it is used, so that nothing here keeps it once concatenated. ``checkpointed``: each
        stage (upsampling, concatenation, convs) keeps only its inputs and recomputes the rest in backward."""
        skips = skips if release else list(skips)
        x, outputs = skips.pop(), []
        for up, stage in zip(self.transpconvs, self.stages):
            if checkpointed:
                x = recomputed(partial(_decoder_stage, up, stage), nn.ModuleList([up, stage]), x, skips.pop())
            else:  # inline, so that no frame holds the skip or the concatenation longer than the ops need them
                x = torch.cat((up(x), skips.pop()), dim=1)
                for unit in stage.convs:  # unit by unit, so that without autograd the concatenation is freed
                    x = unit(x)  # after the first one (2 x the stage's output at full resolution)
            outputs.append(x)
        return outputs[::-1]


def _decoder_stage(up: nn.Module, stage: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """One decoder stage as :meth:`Decoder.forward` runs it (the checkpointed form)."""
    return stage(torch.cat((up(x), skip), dim=1))


def recomputed(fn: Callable[..., torch.Tensor], module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` under activation checkpointing (``torch.utils.checkpoint``, non-reentrant): only the
    inputs are kept, the stage runs again in backward. A submodule naming attributes in
    ``forward_state_attrs`` (e.g. the region experts' ``routing``) gets their forward-time values back
    while it is recomputed, so the recomputation is the same function even outside the forward's context."""
    state = [(m, name, getattr(m, name)) for m in module.modules() for name in getattr(m, "forward_state_attrs", ())]

    @contextmanager
    def restored() -> Iterator[None]:
        now = [(m, name, getattr(m, name)) for m, name, _ in state]
        for m, name, value in state:
            setattr(m, name, value)
        try:
            yield
        finally:
            for m, name, value in now:
                setattr(m, name, value)

    return checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=False, context_fn=lambda: (nullcontext(), restored()))


@dataclass(frozen=True)
class UNetOutput:
    skips: list[torch.Tensor]  # encoder stage outputs, shallow to deep ([] once released, see forward)
    decoded: list[torch.Tensor]  # decoder stage outputs, full resolution first
    pooled: list[torch.Tensor] | None = None  # the skips average-pooled by forward's ``pool`` kernels


class PlainConvUNet(nn.Module):
    """nnU-Net PlainConvUNet without a segmentation head; the per-voxel embedding is ``decoded[0]``."""

    def __init__(
        self,
        features: Sequence[int],
        strides: Sequence[int],
        n_convs: int | Sequence[int] = 2,
        n_convs_decoder: int | Sequence[int] | None = None,
        in_channels: int = 3,
        checkpoint_stages: bool = False,
    ) -> None:
        """``checkpoint_stages``: in training (with autograd), keep only each encoder and decoder stage's
        inputs and recompute the stage in backward (activation checkpointing: less memory, one more forward)."""
        super().__init__()
        if len(features) != len(strides) or len(features) < 2:
            raise ValueError(f"features {list(features)} and strides {list(strides)} must have the same length >= 2")
        n_stages = len(features)
        enc_n = [n_convs] * n_stages if isinstance(n_convs, int) else list(n_convs)
        dec = n_convs if n_convs_decoder is None else n_convs_decoder
        dec_n = [dec] * n_stages if isinstance(dec, int) else list(dec)
        self.features = list(features)
        self.strides = list(strides)
        self.in_channels = in_channels
        self.checkpoint_stages = checkpoint_stages
        self.encoder = Encoder(in_channels, features, strides, enc_n)
        self.decoder = Decoder(features, strides, dec_n)
        self.apply(_init_he)

    @property
    def total_stride(self) -> int:
        out = 1
        for s in self.strides:
            out *= s
        return out

    def stage_strides(self) -> list[int]:
        """Cumulative downsampling factor of each encoder stage."""
        out, acc = [], 1
        for s in self.strides:
            acc *= s
            out.append(acc)
        return out

    def forward(self, x: torch.Tensor, pool: Sequence[int] | None = None) -> UNetOutput:
        """``pool``: one kernel per encoder stage; each skip is average-pooled by it (``pooled``) before
        the decoder runs. Without autograd the skips are then released as the decoder uses them (the
        full-resolution skip is among the largest maps of a window)."""
        checkpointed = self.checkpoint_stages and torch.is_grad_enabled()
        skips = self.encoder(x, checkpointed)
        if pool is None:
            return UNetOutput(skips=skips, decoded=self.decoder(skips, checkpointed=checkpointed))
        pooled = [
            F.avg_pool3d(skip, kernel_size=k, stride=k) if k > 1 else skip
            for skip, k in zip(skips, pool, strict=True)
        ]
        release = not torch.is_grad_enabled()
        decoded = self.decoder(skips, release, checkpointed)
        return UNetOutput(skips=[] if release else skips, decoded=decoded, pooled=pooled)


def _init_he(module: nn.Module) -> None:
    """SAT's ``InitWeights_He(1e-2)``: kaiming normal (a=0.01) on (transposed) convs, zero bias."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

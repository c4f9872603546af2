"""Region experts for inference without peft: the same network, the same state dict keys, the same numbers.

:func:`add_plain_experts` puts an :class:`ExpertConv3d` on every conv that
:func:`~lorkd.experts.build.add_region_experts` gives a peft LoRA layer, with the same ranks, scalings
and ``lora_A``/``lora_B`` shapes, under a :class:`PlainExperts` holder laid out like a ``PeftModel``
(``base_model.model.<unet>``), so a LoRKD checkpoint's student loads into it key for key. The forward
is :class:`~lorkd.experts.routed.RoutedConv`'s, shared with the peft layers; ``ΔW`` is computed as
peft's ``Conv3d.get_delta_weight`` (``experts.style=peft``) or :func:`~lorkd.experts.routed.lorkd_delta`
(``lorkd``) computes it, so probabilities equal the peft network's (``tests/test_experts_plain.py``).
Training keeps peft.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorkd.experts.routed import DECODER_PATTERN, RoutedConv, conv3d_targets, lorkd_delta, require_ranks

STYLES = ("peft", "lorkd")


def peft_conv_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, groups: int) -> torch.Tensor:
    """``s·ΔW`` of a peft conv LoRA (``A`` Conv3d Cin→r k³, ``B`` Conv3d r→Cout 1³), in peft 0.21's order of operations."""
    dtype = a.dtype
    cast = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)  # peft merges those in float32
    if cast:
        a, b = a.float(), b.float()
    delta = F.conv3d(a.transpose(0, 1), b)
    delta = delta * scaling if groups > 1 else delta.transpose(0, 1) * scaling
    return delta.to(dtype) if cast else delta


class ExpertConv3d(RoutedConv, nn.Module):
    """A ``Conv3d`` (``base_layer``) with one LoRA expert per name of ``ranks`` (rank, ``scalings`` ``s``).

    Without routing it applies the first expert, as a freshly built peft model (its active adapter) does.
    """

    def __init__(self, base: nn.Conv3d, ranks: Mapping[str, int], scalings: Mapping[str, float], style: str = "peft") -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown expert style {style!r}; expected one of {list(STYLES)}")
        k = base.kernel_size
        if style == "peft" and tuple(base.weight.shape[2:4]) == (1, 1):
            raise ValueError(f"peft merges 1×1 kernels by another formula; kernel {k} is not supported here")
        if style == "lorkd" and (len(set(k)) != 1 or base.groups != 1):
            raise ValueError(f"LoRKD experts need a cubic kernel and groups=1, got kernel {k}, groups {base.groups}")
        self.base_layer = base
        self.style = style
        self.scaling = dict(scalings)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        c_in, c_out = base.in_channels, base.out_channels
        for name, r in ranks.items():
            if style == "peft":
                self.lora_A[name] = nn.Conv3d(c_in, r, k, base.stride, base.padding, bias=False)
                self.lora_B[name] = nn.Conv3d(r, c_out, 1, 1, groups=base.groups, bias=False)
            else:
                self.lora_A[name] = nn.Linear(c_in * k[0] * k[0], r * k[0], bias=False)
                self.lora_B[name] = nn.Linear(r * k[0], c_out * k[0], bias=False)
        self.active_adapters = tuple(ranks)[:1]

    def get_base_layer(self) -> nn.Conv3d:
        return self.base_layer

    def expert_delta(self, adapter: str) -> torch.Tensor:
        weight, a, b = self.base_layer.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if self.style == "lorkd":
            return lorkd_delta(weight, a, b, self.scaling[adapter])
        return peft_conv_delta(weight, a, b, self.scaling[adapter], self.base_layer.groups)

    def unrouted(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._conv(x, self._weight(self.active_adapters))


class _Model(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class PlainExperts(nn.Module):
    """The U-Net with :class:`ExpertConv3d` layers at ``base_model.model`` (a ``PeftModel``'s key layout);
    calls and other attributes go to the U-Net."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.base_model = _Model(unet)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not built yet (copying, unpickling)
                raise
            return getattr(self.base_model.model, name)


def add_plain_experts(
    unet: nn.Module,
    regions: Sequence[str],
    ranks: Mapping[str, int],
    decoder_rank_factor: int = 2,
    scaling: float = 2.0,
    style: str = "peft",
    train_base: bool = True,
) -> PlainExperts:
    """The arguments of :func:`~lorkd.experts.build.add_region_experts`, without peft (``train_base``
    is a training option: ignored). Ranks and ``lora_alpha`` per layer as that function's peft config:
    ``r`` (decoder: ``decoder_rank_factor``·``r``), ``alpha = scaling·r``, layer scaling ``alpha / r``."""
    require_ranks(regions, ranks)
    for name in conv3d_targets(unet):
        factor = decoder_rank_factor if re.match(rf"(.*\.)?({DECODER_PATTERN})$", name) else 1
        layer_ranks = {region: factor * int(ranks[region]) for region in regions}
        alphas = {region: scaling * factor * int(ranks[region]) for region in regions}
        scalings = {region: alphas[region] / layer_ranks[region] for region in regions}
        parent, _, child = name.rpartition(".")
        holder = unet.get_submodule(parent) if parent else unet
        setattr(holder, child, ExpertConv3d(getattr(holder, child), layer_ranks, scalings, style))
    return PlainExperts(unet)

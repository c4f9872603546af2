"""peft LoRA layers for region experts on ``nn.Conv3d`` with per-sample routing.

Two parameterisations of an expert's weight update ``ΔW`` (both registered as custom peft LoRA layers):

* ``peft`` (:class:`RoutedLoraConv3d`): peft's conv LoRA, ``A`` = Conv3d(Cin→r, k³), ``B`` = Conv3d(r→Cout, 1³),
  ``ΔW[o,i] = s·Σ_j B[o,j]·A[j,i]``.
* ``lorkd`` (:class:`LorkdLoraConv3d`): the official LoRKD experts, ``A`` (r·k, Cin·k²), ``B`` (Cout·k, r·k),
  ``ΔW = s·view(B @ A)`` (stored as bias-free ``nn.Linear`` weights of those shapes).

Routing (:mod:`lorkd.experts.routed`, shared with the peft-free layers used at inference): while a
:class:`~lorkd.experts.routed.Routing` is attached, each sample is convolved with ``W0 + ΔW`` of its own
expert. Without routing the layer behaves like peft: the active adapters' updates are applied to every sample.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.layer import Conv3d as PeftLoraConv3d
from torch import nn

from lorkd.experts.routed import RoutedConv, lorkd_delta


class RoutedLoraConv3d(RoutedConv, PeftLoraConv3d):
    """peft's Conv3d LoRA with grouped per-sample routing (``experts.style=peft``)."""

    def expert_delta(self, adapter: str) -> torch.Tensor:
        return self.get_delta_weight(adapter)

    def unrouted(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = tuple(a for a in self.active_adapters if a in self.lora_A)
        return self._conv(x, self._weight(active))


class LorkdLoraConv3d(RoutedLoraConv3d):
    """The official LoRKD expert parameterisation (``experts.style=lorkd``).

    ``A`` (r·k, Cin·k²) and ``B`` (Cout·k, r·k) with ``ΔW = s·(B @ A).view(Cout, Cin, k, k, k)``; as a
    Cout×(Cin·k³) matrix this update can have rank up to 3r. Parameters per expert: r·(k³·Cin + k²·Cout).
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        base = self.get_base_layer()
        k = base.kernel_size
        if len(set(k)) != 1 or base.groups != 1:
            raise ValueError(f"LoRKD experts need a cubic kernel and groups=1, got kernel {k}, groups {base.groups}")
        k0 = k[0]
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features * k0 * k0, r * k0, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * k0, self.out_features * k0, bias=False)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        if config.init_lora_weights:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return lorkd_delta(weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])


EXPERT_LAYERS: dict[str, type[RoutedLoraConv3d]] = {"peft": RoutedLoraConv3d, "lorkd": LorkdLoraConv3d}


"""peft LoRA layers for region experts on ``nn.Conv3d`` with per-sample routing.

Two parameterisations of an expert's weight update ``ΔW`` (both registered as custom peft LoRA layers):

* ``peft`` (:class:`RoutedLoraConv3d`): peft's conv LoRA, ``A`` = Conv3d(Cin→r, k³), ``B`` = Conv3d(r→Cout, 1³),
  ``ΔW[o,i] = s·Σ_j B[o,j]·A[j,i]``.
* ``lorkd`` (:class:`LorkdLoraConv3d`): the released LoRKD experts, ``A`` (r·k, Cin·k²), ``B`` (Cout·k, r·k),
  ``ΔW = s·view(B @ A)`` (stored as bias-free ``nn.Linear`` weights of those shapes).

Routing: while a :class:`Routing` is attached (see ``lorkd.experts.build.route``), each sample is convolved
with ``W0 + ΔW`` of its own expert (a batch of one expert: one plain convolution). Experts absent from the
batch are not in the graph, so they get no gradient. Without routing the layer behaves like
peft: the active adapters' updates are applied to every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Conv3d as PeftLoraConv3d
from torch import nn


@dataclass(frozen=True)
class Routing:
    """Which samples of the batch use which expert.

    ``groups``: (adapter names applied together — empty for the shared base alone, sample indices or None
    for the whole batch); ``sample_group[b]`` is the group of sample ``b``. A batch mixing experts runs
    either one convolution per group on its sub-batch (``per_sample_weights=False``, the CPU default:
    bit-identical to running each group alone) or one grouped convolution with a weight per sample
    (``True``, the CUDA default: the paper's EKS form restricted to the experts present, fastest measured
    on the H100, see ``scripts/benchmarks/RESULTS.md``).
    """

    groups: tuple[tuple[tuple[str, ...], torch.Tensor | None], ...]
    batch_size: int
    sample_group: torch.Tensor | None = None
    per_sample_weights: bool = False
    runs: tuple[tuple[tuple[str, ...], int, int], ...] | None = None  # (adapters, start, stop) when contiguous


class RoutedLoraConv3d(PeftLoraConv3d):
    """peft's Conv3d LoRA with grouped per-sample routing (``experts.style=peft``)."""

    routing: Routing | None = None
    _merged: tuple[tuple, torch.Tensor] | None = None  # (stamp, W0 + ΔW) of the last expert used without grad

    def expert_delta(self, adapter: str) -> torch.Tensor:
        """``s·ΔW`` of one expert, shaped like the base weight."""
        return self.get_delta_weight(adapter)

    def _stamp(self, adapters: tuple[str, ...]) -> tuple:
        """Identifies the tensors a merged weight was built from (changes on any in-place update or move)."""
        tensors = [self.get_base_layer().weight]
        for name in adapters:
            tensors += [self.lora_A[name].weight, self.lora_B[name].weight]
        return adapters, tuple((t.data_ptr(), t._version) for t in tensors)

    def _weight(self, adapters: tuple[str, ...]) -> torch.Tensor:
        """``W0 + Σ ΔW`` of ``adapters``; without grad (inference) the last one is kept and reused."""
        if torch.is_grad_enabled():
            return self._merge(adapters)
        stamp = self._stamp(adapters)
        if self._merged is None or self._merged[0] != stamp:
            self._merged = (stamp, self._merge(adapters))
        return self._merged[1]

    def _merge(self, adapters: tuple[str, ...]) -> torch.Tensor:
        weight = self.get_base_layer().weight
        for name in adapters:
            weight = weight + self.expert_delta(name).to(weight.dtype)
        return weight

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        bias = base.bias
        if bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)
        x = x.to(weight.dtype) if x.dtype != weight.dtype and not torch.is_autocast_enabled() else x
        return base._conv_forward(x, weight, bias)

    def _per_sample_conv(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` (B, Cout, Cin, k, k, k): sample b convolved with its own weight, one grouped conv."""
        base = self.get_base_layer()
        b, c_in = x.shape[:2]
        bias = None if base.bias is None else base.bias.to(weights.dtype).repeat(b)
        y = torch.nn.functional.conv3d(
            x.reshape(1, b * c_in, *x.shape[2:]), weights.reshape(b * weights.shape[1], *weights.shape[2:]),
            bias, base.stride, base.padding, base.dilation, groups=b,
        )  # fmt: skip
        return y.view(b, -1, *y.shape[2:])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.routing
        if routing is None:
            if self.disable_adapters or self.merged:
                return self.base_layer(x, *args, **kwargs)
            active = tuple(a for a in self.active_adapters if a in self.lora_A)
            return self._conv(x, self._weight(active))
        if x.shape[0] != routing.batch_size:
            raise RuntimeError(f"routing was set for a batch of {routing.batch_size}, got {x.shape[0]} samples")
        if len(routing.groups) == 1 and routing.groups[0][1] is None:
            return self._conv(x, self._weight(routing.groups[0][0]))
        if routing.per_sample_weights:
            weights = torch.stack([self._weight(adapters) for adapters, _ in routing.groups])
            return self._per_sample_conv(x, weights.index_select(0, routing.sample_group))
        if routing.runs is not None:  # each expert one block of the batch: slices, no gather/scatter
            return torch.cat([self._conv(x[a:b], self._weight(adapters)) for adapters, a, b in routing.runs])
        outputs, order = [], []
        for adapters, index in routing.groups:
            outputs.append(self._conv(x.index_select(0, index), self._weight(adapters)))
            order.append(index)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outputs).index_select(0, inverse)


class LorkdLoraConv3d(RoutedLoraConv3d):
    """The released LoRKD expert parameterisation (``experts.style=lorkd``).

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
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b @ a).view(weight.shape) * self.scaling[adapter]


EXPERT_LAYERS: dict[str, type[RoutedLoraConv3d]] = {"peft": RoutedLoraConv3d, "lorkd": LorkdLoraConv3d}


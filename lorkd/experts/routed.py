"""Per-sample routing of region experts on ``nn.Conv3d``, without peft (peft layers and peft-free ones share it).

Routing: while a :class:`Routing` is attached (:func:`route`), each sample is convolved with ``W0 + ΔW``
of its own expert (a batch of one expert: one plain convolution). Experts absent from the batch are not
in the graph, so they get no gradient. :class:`RoutedConv` holds that forward for the peft layers of
:mod:`lorkd.experts.layers` (training) and the peft-free :class:`~lorkd.experts.plain.ExpertConv3d`
(inference); a layer only says how it computes one expert's ``ΔW`` and what it does without routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn

DECODER_PATTERN = r"decoder\..*"
MIXED_BATCH_FORMS = ("auto", "split", "per_layer", "per_sample_weights")
Output = TypeVar("Output")


@dataclass(frozen=True)
class Routing:
    """Which samples of the batch use which expert.

    ``groups``: (adapter names applied together — empty for the shared base alone, sample indices or None
    for the whole batch); ``sample_group[b]`` is the group of sample ``b``. A batch mixing experts runs
    either one convolution per group on its sub-batch (``per_sample_weights=False``: bit-identical to
    running each group alone) or one grouped convolution with a weight per sample (``True``: the paper's
    EKS form restricted to the experts present, fastest measured on the H100). Training picks the form,
    or one whole forward per expert, with :func:`forward_routed`.
    """

    groups: tuple[tuple[tuple[str, ...], torch.Tensor | None], ...]
    batch_size: int
    sample_group: torch.Tensor | None = None
    per_sample_weights: bool = False
    runs: tuple[tuple[tuple[str, ...], int, int], ...] | None = None  # (adapters, start, stop) when contiguous


def lorkd_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = s·view(B @ A)`` of the official LoRKD experts, shaped like the base ``weight``."""
    return (b @ a).view(weight.shape) * scaling


class RoutedConv:
    """The routed forward of an expert conv (a mixin of an ``nn.Module`` with ``lora_A``/``lora_B``
    ModuleDicts by expert name, whose ``get_base_layer()`` is the ``nn.Conv3d``: peft's, or
    :class:`~lorkd.experts.plain.ExpertConv3d`'s); subclasses give :meth:`expert_delta` and :meth:`unrouted`."""

    routing: Routing | None = None
    forward_state_attrs = ("routing",)  # restored while an activation-checkpointed stage is recomputed
    _merged: tuple[tuple, torch.Tensor] | None = None  # (stamp, W0 + ΔW) of the last expert used without grad
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict

    def expert_delta(self, adapter: str) -> torch.Tensor:
        """``s·ΔW`` of one expert, shaped like the base weight."""
        raise NotImplementedError

    def unrouted(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The forward without a :class:`Routing` attached."""
        raise NotImplementedError

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
            return self.unrouted(x, *args, **kwargs)
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


def require_ranks(regions: Sequence[str], ranks: Mapping[str, int]) -> None:
    """Every region of ``regions`` has a rank in ``ranks`` (KeyError naming the others)."""
    missing = [r for r in regions if r not in ranks]
    if missing:
        raise KeyError(f"no expert rank configured for regions {missing}")


def conv3d_targets(unet: nn.Module) -> list[str]:
    """Names of the plain ``nn.Conv3d`` modules (exact type: transposed convs and LoRA convs excluded)."""
    return [name for name, m in unet.named_modules() if type(m) is nn.Conv3d]


def expert_layers(model: nn.Module) -> list[RoutedConv]:
    return [m for m in model.modules() if isinstance(m, RoutedConv)]


def expert_names(model: nn.Module) -> list[str]:
    layers = expert_layers(model)
    return list(layers[0].lora_A.keys()) if layers else []


def make_routing(region_index: torch.Tensor, names: Sequence[str], per_sample_weights: bool | None = None) -> Routing:
    """Group samples by expert index (``-1`` = shared base only).

    ``per_sample_weights`` (mixed batches only): None picks the faster form for the tensor's device
    (one grouped conv with per-sample weights on CUDA, one conv per expert group elsewhere).
    """
    index = region_index.detach().to("cpu", torch.long)
    if index.ndim != 1:
        raise ValueError(f"region index must be 1-D (one expert per sample), got shape {tuple(index.shape)}")
    bad = [int(i) for i in index.unique() if not -1 <= int(i) < len(names)]
    if bad:
        raise IndexError(f"expert index {bad} out of range for {len(names)} experts {list(names)}")
    uniques, inverse = index.unique(return_inverse=True)
    device = region_index.device
    if len(uniques) == 1:
        u = int(uniques[0])
        return Routing(groups=(((names[u],) if u >= 0 else (), None),), batch_size=len(index))
    groups = tuple(
        (((names[u],) if u >= 0 else ()), torch.nonzero(index == u).flatten().to(device)) for u in uniques.tolist()
    )
    if per_sample_weights is None:
        per_sample_weights = device.type == "cuda"
    return Routing(groups, len(index), inverse.to(device), per_sample_weights, _contiguous_runs(index, names))


def _contiguous_runs(index: torch.Tensor, names: Sequence[str]) -> tuple[tuple[tuple[str, ...], int, int], ...] | None:
    """(adapters, start, stop) per expert when each expert's samples form one block of the batch."""
    change = torch.nonzero(index[1:] != index[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(index)]
    runs = [(int(index[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if len({u for u, _, _ in runs}) != len(runs):
        return None
    return tuple((((names[u],) if u >= 0 else ()), a, b) for u, a, b in runs)


@contextmanager
def route(model: nn.Module, region_index: torch.Tensor, per_sample_weights: bool | None = None) -> Iterator[None]:
    """Within the block, sample ``b`` of every forward through ``model`` uses expert ``region_index[b]``."""
    layers = expert_layers(model)
    if not layers:
        raise RuntimeError("the model has no region experts to route to")
    routing = make_routing(region_index, list(layers[0].lora_A.keys()), per_sample_weights)
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


def check_mixed_batch(mixed_batch: str) -> str:
    """``mixed_batch`` if it is one of :data:`MIXED_BATCH_FORMS`, else a ValueError naming them."""
    if mixed_batch not in MIXED_BATCH_FORMS:
        raise ValueError(f"mixed_batch must be one of {MIXED_BATCH_FORMS}, got {mixed_batch!r}")
    return mixed_batch


def forward_routed(
    forward: Callable[..., Output],
    model: nn.Module,
    region_index: torch.Tensor,
    batched: Sequence[torch.Tensor],
    mixed_batch: str = "auto",
) -> Output:
    """``forward(*batched)`` with sample ``b`` routed to expert ``region_index[b]`` in ``model``'s expert convs.

    A batch mixing experts runs in the ``mixed_batch`` form: ``split``, one ``forward`` per expert on its
    sub-batch (``batched`` cut along dim 0, the outputs put back in batch order); ``per_layer``, one
    forward with one conv per expert group in every expert conv; ``per_sample_weights``, one forward with
    one grouped conv of per-sample weights; ``auto``, the fastest measured for the device
    (``scripts/benchmarks/routing.py``): ``per_sample_weights`` on CUDA, ``split`` elsewhere. All forms
    compute the same function (per-sample normalisation only); a batch of one expert is one plain forward.
    """
    if check_mixed_batch(mixed_batch) == "auto":
        mixed_batch = "per_sample_weights" if region_index.device.type == "cuda" else "split"
    experts = region_index.unique() if mixed_batch == "split" else None  # no device sync for the other forms
    if experts is None or len(experts) == 1:
        with route(model, region_index, mixed_batch == "per_sample_weights"):
            return forward(*batched)
    outputs, order = [], []
    for expert in experts:
        index = torch.nonzero(region_index == expert).flatten()
        with route(model, region_index.index_select(0, index)):
            outputs.append(forward(*(x.index_select(0, index.to(x.device)) for x in batched)))
        order.append(index)
    return _in_batch_order(outputs, torch.argsort(torch.cat(order)))


def _in_batch_order(parts: list[Any], inverse: torch.Tensor) -> Any:
    """Concatenate per-group outputs (tensors, or lists/tuples/dataclasses of them, batch first) and
    reorder the samples by ``inverse``."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts).index_select(0, inverse.to(first.device))
    if is_dataclass(first):
        return replace(first, **{f.name: _in_batch_order([getattr(p, f.name) for p in parts], inverse) for f in fields(first)})
    if isinstance(first, (list, tuple)):
        return type(first)(_in_batch_order(list(items), inverse) for items in zip(*parts))
    raise TypeError(f"cannot put {type(first).__name__} outputs back in batch order")


def expert_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of each expert (its A and B tensors over all layers)."""
    counts: dict[str, int] = {}
    for layer in expert_layers(model):
        for name in layer.lora_A:
            n = layer.lora_A[name].weight.numel() + layer.lora_B[name].weight.numel()
            counts[name] = counts.get(name, 0) + n
    return counts


def base_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)

"""Build, route, count and merge region experts on a student U-Net with peft.

One LoRA adapter per region on every 3×3×3 ``Conv3d`` of the encoder and decoder (transposed convs are
not adapted); decoder rank = ``decoder_rank_factor`` × encoder rank; scaling ``s`` for every expert and
layer (``lora_alpha = s·r``). The shared base weights ``W0`` train too unless ``train_base=False``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lorkd.experts.layers import EXPERT_LAYERS, RoutedLoraConv3d, Routing

DECODER_PATTERN = r"decoder\..*"


def conv3d_targets(unet: nn.Module) -> list[str]:
    """Names of the plain ``nn.Conv3d`` modules (exact type: transposed convs and LoRA convs excluded)."""
    return [name for name, m in unet.named_modules() if type(m) is nn.Conv3d]


def _lora_config(rank: int, factor: int, scaling: float, targets: list[str], style: str) -> LoraConfig:
    if style not in EXPERT_LAYERS:
        raise ValueError(f"unknown expert style {style!r}; expected one of {sorted(EXPERT_LAYERS)}")
    config = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        target_modules=targets,
        rank_pattern={DECODER_PATTERN: factor * rank},
        alpha_pattern={DECODER_PATTERN: scaling * factor * rank},
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    config._register_custom_module({nn.Conv3d: EXPERT_LAYERS[style]})
    return config


def add_region_experts(
    unet: nn.Module,
    regions: Sequence[str],
    ranks: Mapping[str, int],
    decoder_rank_factor: int = 2,
    scaling: float = 2.0,
    style: str = "peft",
    train_base: bool = True,
) -> PeftModel:
    """Wrap ``unet`` in a ``PeftModel`` holding one expert adapter per region (names = region names)."""
    missing = [r for r in regions if r not in ranks]
    if missing:
        raise KeyError(f"no expert rank configured for regions {missing}")
    targets = conv3d_targets(unet)
    model: PeftModel | None = None
    for region in regions:
        config = _lora_config(int(ranks[region]), decoder_rank_factor, scaling, targets, style)
        if model is None:
            model = get_peft_model(unet, config, adapter_name=region)
        else:
            model.add_adapter(region, config)
    assert model is not None, "at least one region is needed"
    set_trainable(model, train_base)
    return model


def set_trainable(model: PeftModel, train_base: bool) -> None:
    """Every expert trains; the shared base (incl. norms and transposed convs) trains iff ``train_base``."""
    for name, p in model.named_parameters():
        p.requires_grad_(train_base or ".lora_" in name)


def expert_layers(model: nn.Module) -> list[RoutedLoraConv3d]:
    return [m for m in model.modules() if isinstance(m, RoutedLoraConv3d)]


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


def merged_unet(model: PeftModel, region: str | None) -> nn.Module:
    """A standalone copy of the base U-Net with ``region``'s expert folded into ``W0`` (None: base only)."""
    clone = copy.deepcopy(model)
    if region is None:
        return clone.unload()
    if region not in expert_names(clone):
        raise KeyError(f"no expert {region!r}; available: {expert_names(clone)}")
    return clone.merge_and_unload(adapter_names=[region])

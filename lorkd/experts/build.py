"""Build and merge region experts on a student U-Net with peft (routing and counts: :mod:`lorkd.experts.routed`).

One LoRA adapter per region on every 3×3×3 ``Conv3d`` of the encoder and decoder (transposed convs are
not adapted); decoder rank = ``decoder_rank_factor`` × encoder rank; scaling ``s`` for every expert and
layer (``lora_alpha = s·r``). The shared base weights ``W0`` train too unless ``train_base=False``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lorkd.experts.layers import EXPERT_LAYERS
from lorkd.experts.routed import DECODER_PATTERN, conv3d_targets, expert_names, require_ranks


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
    require_ranks(regions, ranks)
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


def merged_unet(model: PeftModel, region: str | None) -> nn.Module:
    """A standalone copy of the base U-Net with ``region``'s expert folded into ``W0`` (None: base only)."""
    clone = copy.deepcopy(model)
    if region is None:
        return clone.unload()
    if region not in expert_names(clone):
        raise KeyError(f"no expert {region!r}; available: {expert_names(clone)}")
    return clone.merge_and_unload(adapter_names=[region])

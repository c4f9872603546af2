"""Region experts: LoRA adapters on the student U-Net's 3×3×3 convs, routed per sample.

Training builds them with peft (:mod:`lorkd.experts.build`, imported on first use of
``add_region_experts`` / ``merged_unet``); routing and counts (:mod:`lorkd.experts.routed`) and the
inference layers (:mod:`lorkd.experts.plain`) do not import peft.
"""

from typing import Any

from lorkd.experts.routed import (
    base_parameter_count,
    expert_names,
    expert_parameter_counts,
    forward_routed,
    route,
)

_PEFT = ("add_region_experts", "merged_unet")

__all__ = [
    "add_region_experts",
    "base_parameter_count",
    "expert_names",
    "expert_parameter_counts",
    "forward_routed",
    "merged_unet",
    "route",
]


def __getattr__(name: str) -> Any:
    if name in _PEFT:
        from lorkd.experts import build

        return getattr(build, name)
    raise AttributeError(f"module 'lorkd.experts' has no attribute {name!r}")

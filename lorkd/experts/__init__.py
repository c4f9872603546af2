"""Region experts: peft LoRA adapters on the student U-Net's 3×3×3 convs, routed per sample."""

from lorkd.experts.build import (
    add_region_experts,
    base_parameter_count,
    expert_names,
    expert_parameter_counts,
    merged_unet,
    route,
)

__all__ = [
    "add_region_experts",
    "base_parameter_count",
    "expert_names",
    "expert_parameter_counts",
    "merged_unet",
    "route",
]

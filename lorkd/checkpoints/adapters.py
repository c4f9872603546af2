"""Save and reload a student's region experts as peft adapters, with its shared base, for further fine-tuning.

Folder layout (``DIR/adapters`` of an export)::

    experts.json                         architecture + ``add_region_experts`` arguments + sha256 of every file
    base.safetensors                     the plain student SAT with the shared W0 (no expert merged)
    <region>/adapter_model.safetensors   peft ``save_pretrained`` output, one folder per expert
    <region>/adapter_config.json

``experts.style=lorkd`` adapters hold the official A (3r, 9·Cin) / B (3·Cout, 3r) tensors, which peft's own
Conv3d LoRA cannot host: reload them with :func:`load_adapters` (it registers our custom layer), not with
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorkd.checkpoints.build import add_experts
from lorkd.checkpoints.exported import BASE, load_plain_sat, read_json, verify_file
from lorkd.checkpoints.key_report import CheckpointMismatchError
from lorkd.checkpoints.schema import AdapterSpec, ExpertsSpec
from lorkd.experts import merged_unet
from lorkd.experts.build import set_trainable
from lorkd.io import sha256_file, write_json
from lorkd.models.sat import SAT

SPEC = "experts.json"
ADAPTER_FILE = "adapter_model.safetensors"


def plain_state(net: SAT, region: str | None) -> dict[str, torch.Tensor]:
    """State of a plain ``SAT`` equal to ``net`` (peft experts on its backbone) routed to ``region`` (None: W0)."""
    backbone = merged_unet(net.backbone, region)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    state.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_adapters(net: SAT, experts: ExpertsSpec, folder: Path, architecture: dict[str, Any]) -> AdapterSpec:
    """Write the shared base, every expert adapter (peft ``save_pretrained``) and ``experts.json``; returns the spec."""
    backbone = net.backbone
    if not isinstance(backbone, PeftModel):
        raise TypeError(f"the student's backbone must be a PeftModel with region experts, got {type(backbone).__name__}")
    folder.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(str(folder))
    spec = AdapterSpec(architecture=dict(architecture), experts=experts, files={})
    save_file(plain_state(net, None), str(folder / BASE), metadata={"format": spec.format})
    for name in [BASE, *(f"{r}/{ADAPTER_FILE}" for r in experts.regions)]:
        spec.files[name] = {"sha256": sha256_file(folder / name)}
    write_json(folder / SPEC, spec.to_json())
    return spec


def load_adapters(folder: str | Path, verify: bool = True) -> SAT:
    """The student again: plain base + every expert (our custom peft layers), trainable as configured.

    Route with ``lorkd.experts.route``; fine-tune it directly, or save it into a LoRKD checkpoint.
    """
    folder = Path(folder)
    spec = AdapterSpec.from_json(read_json(folder / SPEC), str(folder / SPEC))
    if verify:
        for name, entry in spec.files.items():
            verify_file(folder / name, entry["sha256"])
    net = load_plain_sat(folder / BASE, spec.architecture["arguments"]).train()
    experts = spec.experts
    add_experts(net, experts)
    for region in experts.regions:
        path = folder / region / ADAPTER_FILE
        state = load_file(str(path))
        result = set_peft_model_state_dict(net.backbone, state, adapter_name=region)
        missing = [k for k in result.missing_keys if f".lora_A.{region}." in k or f".lora_B.{region}." in k]
        if missing or result.unexpected_keys:
            raise CheckpointMismatchError(
                f"{path}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]} (adapter does not fit the base)"
            )
    set_trainable(net.backbone, experts.train_base)
    return net

"""Test helpers: compose project configs, build tiny models, write checkpoints in SAT's official layout."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lorkd.models.sat import SAT
from lorkd.utils import CONFIG_DIR, register_resolvers

TINY = dict(
    features=[8, 16, 32, 64], strides=[1, 2, 2, 2], n_convs=2, query_dim=64, proj_hidden=64, mask_hidden=32,
    decoder_layers=2, decoder_heads=4, decoder_ffn=128, dropout=0.0, latent_stride=16,
)  # fmt: skip


def compose_config(name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=True)


def tiny_sat(**overrides) -> SAT:
    torch.manual_seed(0)
    return SAT(**{**TINY, **overrides})


def official_vision_layout(model: SAT) -> dict[str, torch.Tensor]:
    """What SAT's DDP-wrapped Maskformer saves: ``module.`` prefix, ``all_modules`` aliases, stacked in_proj."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    qkv = re.compile(r"^(.*\.multihead_attn)\.(q|k|v)_proj\.(weight|bias)$")
    for key, value in state.items():
        m = qkv.match(key)
        if m:
            base, which, kind = m.groups()
            if which == "q":
                parts = [state[f"{base}.{p}_proj.{kind}"] for p in "qkv"]
                out[f"module.{base}.in_proj_{kind}"] = torch.cat(parts, 0).clone()
            continue
        out[f"module.{key}"] = value.clone()
        unit = re.match(r"^(.*\.convs\.\d+)\.(conv|norm)\.(weight|bias)$", key)
        if unit:
            base, mod, kind = unit.groups()
            out[f"module.{base}.all_modules.{0 if mod == 'conv' else 1}.{kind}"] = out[f"module.{key}"]
    return out

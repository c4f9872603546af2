"""Test helpers: compose project configs, build tiny models, write checkpoints in SAT's official layout."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lorkd.checkpoints.sat_official import official_vision_state as official_vision_layout  # noqa: F401 (used by tests)
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


def official_text_layout(folder: Path, query_dim: int, layers: int = 1) -> tuple[dict[str, torch.Tensor], Path, torch.nn.Module]:
    """SAT's text-encoder state_dict (``module.`` prefix) around a tiny random BERT tower (hidden 32,
    projection 32 -> 48 -> ``query_dim``). The tower's config and tokenizer go to ``folder/tower``.
    Returns (state, tower folder, tower)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorkd.prompts import default_language_model_path

    lm_dir = folder / "tower"
    AutoTokenizer.from_pretrained(default_language_model_path()).save_pretrained(lm_dir)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(lm_dir)
    torch.manual_seed(0)
    tower = BertModel(config).eval()
    state = {f"module.text_tower.biolord.{k}": v for k, v in tower.state_dict().items()}
    state.update({
        "module.projection_layer.0.weight": torch.randn(48, 32), "module.projection_layer.0.bias": torch.zeros(48),
        "module.projection_layer.2.weight": torch.randn(query_dim, 48), "module.projection_layer.2.bias": torch.zeros(query_dim),
        "module.modality_embed.weight": torch.randn(4, query_dim),
    })  # fmt: skip
    return state, lm_dir, tower


def demo_overrides(data_dir, out_dir, steps: int = 2) -> list[str]:
    """Overrides for a fast CPU run on a small demo set built by ``build_demo``."""
    return [
        f"data.train_manifest={data_dir}/train.jsonl",
        f"data.val_manifest={data_dir}/val.jsonl",
        f"data.test_manifest={data_dir}/test.jsonl",
        f"paths.cache_dir={out_dir}/cache",
        "data.patch_size=[32,32,16]",
        "data.preprocess.spacing=[1.0,1.0,3.0]",  # the tests' expectations (the demo itself runs at 2x2x3 mm)
        "data.samples_per_epoch=8",
        "data.val_patches_per_item=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        "~callbacks.progress_bar",
        "logger=csv",
    ]


def run_training(overrides: Sequence[str], out_dir) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides``, point its outputs at ``out_dir`` and fit in-process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lorkd.training import train

    cfg = compose_config("train", overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    train(cfg)
    return cfg


class RankDigest(__import__("lightning").pytorch.Callback):
    """Lightning callback (for DDP tests): every rank reports a digest of its weights and the regions it
    trained on; rank 0 writes ``{"digests": [...], "regions": [...], "lora_b_norms": {...}}`` to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.regions: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.regions.update(int(r) for r in batch["region"])

    def on_train_end(self, trainer, pl_module) -> None:
        import hashlib
        import json

        import torch.distributed as dist

        digest = hashlib.sha256()
        for name, p in sorted(pl_module.named_parameters()):
            digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
        mine = {"digest": digest.hexdigest(), "regions": sorted(self.regions)}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if trainer.is_global_zero:
            norms: dict[str, float] = {}
            for name, p in pl_module.student.named_parameters():
                if ".lora_B." in name:
                    region = name.split(".lora_B.")[1].split(".")[0]
                    norms[region] = norms.get(region, 0.0) + float(p.detach().abs().sum())
            out = {
                "digests": [g["digest"] for g in gathered],
                "regions": sorted({r for g in gathered for r in g["regions"]}),
                "per_rank_regions": [g["regions"] for g in gathered],
                "lora_b_norms": norms,
                "expert_names": list(pl_module.experts_spec.regions),
            }
            with open(self.path, "w") as f:
                json.dump(out, f)


def run_script(script: str, args: Sequence[str], cwd, env=None, timeout: float = 300):
    """``python <repo>/<script> ARGS`` in its own process group; killed (and the test failed) on timeout.

    Returns a ``CompletedProcess`` with text ``stdout`` and ``stderr``.
    """
    import os
    import signal
    import subprocess
    import sys

    import pytest

    command = [sys.executable, str(Path(CONFIG_DIR).parent / script), *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{script} timed out:\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def train_until_signal(overrides: Sequence[str], last: Path, cwd, env=None, signum: int = signal.SIGTERM, timeout: float = 300):
    """``python train.py OVERRIDES`` until ``last`` (its last.ckpt) exists, then ``signum`` (SIGTERM, as a
    scheduler sends it) to that process. Returns ``(exit code, stdout and stderr)``; killed on timeout."""
    import os
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, str(Path(CONFIG_DIR).parent / "train.py"), *overrides], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if process.poll() is None:
            process.send_signal(signum)
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, output

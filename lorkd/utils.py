"""Small helpers shared by the entry points: Hydra resolvers, configs as plain Python, instantiation of
callback/logger groups, gathering objects from every rank."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
# an installed package carries the configs as lorkd/configs (setup.py maps the top-level configs/ there);
# a repository checkout reads the top-level configs/ itself
INSTALLED = (_PACKAGE_DIR / "configs").is_dir()
CONFIG_DIR = _PACKAGE_DIR / "configs" if INSTALLED else _PACKAGE_DIR.parent / "configs"


def project_root() -> Path:
    """Where default outputs go (``outputs/``): the repository root, or the working directory when installed."""
    return Path.cwd() if INSTALLED else _PACKAGE_DIR.parent


PROJECT_ROOT = project_root()


def accumulation(batch_per_step: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step (``${accumulate:batch_per_step,data.batch_size}``), so that the
    optimizer sees ``batch_per_step`` samples per device whatever micro-batch fits the device."""
    if int(micro_batch) < 1 or int(batch_per_step) % int(micro_batch):
        raise ValueError(
            f"batch_per_step={batch_per_step} is not a whole number of micro-batches of data.batch_size={micro_batch}; "
            "pick a data.batch_size that divides it (or set trainer.accumulate_grad_batches yourself)"
        )
    return int(batch_per_step) // int(micro_batch)


def register_resolvers() -> None:
    """``${project_root:}`` (see :func:`project_root`), ``${config_dir:}`` (the config tree in use) and
    ``${accumulate:B,b}`` (:func:`accumulation`)."""
    if not OmegaConf.has_resolver("accumulate"):
        OmegaConf.register_new_resolver("accumulate", accumulation)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("config_dir"):
        OmegaConf.register_new_resolver("config_dir", lambda: str(CONFIG_DIR))


def offline_environment() -> None:
    """No network at run time: Hugging Face loads stay local, W&B stays offline unless asked otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")


def single_log_stream() -> None:
    """Lightning adds its own console handler at import; under Hydra the root logger already prints
    (and writes the run's log file), so drop Lightning's to avoid every line twice."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def freeze_startup_objects() -> None:
    """Leave every object made so far (modules, the loaded model) out of all later garbage collections,
    the interpreter's at exit included (``gc.freeze``): torch's few hundred thousand objects made the exit
    of ``python predict.py`` 0.3 s slower. For a command once its start-up is done: these objects live
    until the process ends anyway."""
    gc.freeze()


def plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain Python, resolved; anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's ``items`` concatenated in rank order, on every rank (``items`` itself outside a
    process group). ``all_gather_object`` takes ragged lists, unlike ``LightningModule.all_gather`` under gloo."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def close_process_group() -> None:
    """Wait for every rank, then destroy the default process group (a no-op outside one).

    Left to interpreter shutdown, gloo's worker threads can outlive the interpreter and abort the
    process (``terminate called without an active exception``, exit -6) after a job that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers); None -> []."""
    from hydra.utils import instantiate

    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]

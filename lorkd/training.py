"""``python train.py``: compose data, model, callbacks, loggers and trainer from the config, then fit."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig

from lorkd.utils import instantiate_group, plain, single_log_stream

log = logging.getLogger(__name__)


def hyperparameters(cfg: DictConfig) -> dict:
    """The resolved run config (without Hydra's own node) for the loggers."""
    return {
        k: plain(v)
        for k, v in cfg.items()
        if k != "hydra"
    }


def train(cfg: DictConfig) -> dict[str, float]:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lorkd.modules.checkpoint_io import SafeCheckpointIO

    single_log_stream()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()]
    )
    if trainer.is_global_zero:
        for logger in loggers:
            logger.log_hyperparams(hyperparameters(cfg))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (resume from <run dir>/checkpoints/last.ckpt)")
    with warnings.catch_warnings():
        # Lightning looks for resumable loaders only; LoRKDDataModule keeps the sampler's place in its own state
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log.info("finished at step %d; output in %s", trainer.global_step, cfg.paths.output_dir)
    return metrics

"""``python train.py``: compose data, model, callbacks, loggers and trainer from the config, then fit.

SIGTERM (what SLURM and most schedulers send before they kill a job) stops training after the step in
progress with ``last.ckpt`` holding that step (``lorkd.callbacks.checkpoint.ResumeCheckpoint``); the run
then says so and exits with :data:`lorkd.exit_codes.STOPPED`.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from lorkd.exit_codes import STOPPED, Stopped
from lorkd.utils import instantiate_group, plain, single_log_stream

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


def hyperparameters(cfg: DictConfig) -> dict:
    """The resolved run config (without Hydra's own node) for the loggers."""
    return {
        k: plain(v)
        for k, v in cfg.items()
        if k != "hydra"
    }


def _spawned(trainer: pl.Trainer) -> bool:
    """Whether fit runs in spawned worker processes (``ddp_spawn``) whose loop state does not come back here."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """Where the checkpoint callback writes ``last.ckpt`` (None without one, or with ``save_last`` off)."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.save_last or not callback.dirpath:
        return None
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


def reached_step(trainer: pl.Trainer) -> int | None:
    """The global step training reached: the trainer's own, or under ``ddp_spawn`` (the workers' state
    stays in the workers) the step in ``last.ckpt``, which is written when training ends or stops."""
    if not _spawned(trainer):
        return trainer.global_step
    last = last_checkpoint(trainer)
    if last is None or not last.is_file():
        return None
    import torch

    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])


@contextmanager
def _sigterm_to_workers(trainer: pl.Trainer) -> Iterator[list[int]]:
    """Under ``ddp_spawn`` the main process only waits for its workers and has no SIGTERM handler of its
    own (it would die at once): pass SIGTERM on to the workers, which stop as any rank does. Yields the
    signals received."""
    received: list[int] = []
    if not _spawned(trainer) or threading.current_thread() is not threading.main_thread():
        yield received
        return
    launcher = trainer.strategy.launcher

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        launcher.kill(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(trainer: pl.Trainer, signal_name: str) -> Stopped:
    """Say which signal stopped the run at which step, where its state is and how to resume; the exit to raise."""
    step = reached_step(trainer)
    last = last_checkpoint(trainer)
    where = (
        f"{last} holds it; resume with ckpt_path={last}" if last is not None and last.is_file()
        else "no last.ckpt was written (no checkpoint callback with save_last)"
    )  # fmt: skip
    log.warning(
        "stopped by %s at step %s of %d: %s (exit code %d)",
        signal_name, "?" if step is None else step, trainer.max_steps, where, STOPPED,
    )  # fmt: skip
    return Stopped(signal_name)


def train(cfg: DictConfig) -> dict[str, float]:
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.multiprocessing import ProcessExitedException

    from lorkd.modules.checkpoint_io import SafeCheckpointIO

    single_log_stream()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    # one region map for data and model: labels the data adds (lorkd.data.nnunet) reach the checkpoints
    shared = getattr(datamodule, "region_map", None)
    model = instantiate(cfg.model, **({"region_map": shared} if shared is not None and "region_map" in cfg.model else {}))
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
    with warnings.catch_warnings(), _sigterm_to_workers(trainer) as forwarded:
        # Lightning looks for resumable loaders only; LoRKDDataModule keeps the sampler's place in its own state
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except Stopped as exc:
            raise _stopped(trainer, exc.signal_name) from None
        except SIGTERMException:  # Lightning's own, before ResumeCheckpoint took the signal over (or without it)
            raise _stopped(trainer, "SIGTERM") from None
        except ProcessExitedException as exc:  # a ddp_spawn worker's exit
            if not forwarded or exc.exit_code != STOPPED:
                raise
            raise _stopped(trainer, signal.Signals(forwarded[0]).name) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    step = reached_step(trainer)
    log.info("finished at step %s; output in %s", "?" if step is None else step, cfg.paths.output_dir)
    return metrics

"""The jobs behind ``lorkd-export`` (``configs/export.yaml``) and the official-LoRKD converter
(``configs/convert.yaml``); :mod:`lorkd.cli` makes them Hydra apps.

    lorkd-export ckpt_path=outputs/lorkd/checkpoints/last.ckpt output_dir=exports/lorkd [only=[abdomen,thorax]] [onnx=true]
    lorkd-export ckpt_path=lorkd-imbalance-pro.pth output_dir=exports/lorkd-pro \\
        official.text_checkpoint=pro_text_encoder.pth official.language_model_path=/models/BioLORD-2023-C
    python scripts/convert_lorkd_official.py ckpt_path=lorkd-imbalance-pro.pth output_path=lorkd-pro.ckpt \\
        official.text_checkpoint=pro_text_encoder.pth official.language_model_path=/models/BioLORD-2023-C

A bad input (missing file, existing output without ``overwrite=true``, unknown region, mismatching
checkpoint) ends the command with one line ``<command>: error: ...`` and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lorkd.checkpoints.exported import ExportIntegrityError
from lorkd.checkpoints.key_report import CheckpointMismatchError

_USER_ERRORS = (
    FileExistsError, FileNotFoundError, KeyError, ValueError, CheckpointMismatchError, ExportIntegrityError,
    MissingMandatoryValue,
)  # fmt: skip


def _official(cfg: DictConfig) -> dict[str, Any]:
    """The ``official:`` options that are set (for official LoRKD files)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.official, resolve=True, throw_on_missing=True).items() if v is not None}


def run_command(command: str, job: Callable[[], Any]) -> None:
    """Print ``job()``'s result; a user error ends the command with one line ``<command>: error: ...`` (exit 1)."""
    try:
        print(job())
    except _USER_ERRORS as error:
        if isinstance(error, MissingMandatoryValue):
            message = f"{error.full_key}=... is required"
        else:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def export(cfg: DictConfig) -> None:
    """One merged standalone model per region + adapters in ``cfg.output_dir`` (:func:`lorkd.api.export`)."""
    from lorkd.api import export as run

    regions = list(cfg.only) if cfg.only is not None else None
    run_command(
        "lorkd-export",
        lambda: run(cfg.ckpt_path, cfg.output_dir, regions=regions, overwrite=cfg.overwrite, onnx=cfg.onnx, **_official(cfg)),
    )


def convert(cfg: DictConfig) -> None:
    """Official ``lorkd-imbalance-*.pth`` -> one of our LoRKD checkpoints (see lorkd.checkpoints.lorkd_official)."""
    from lorkd.checkpoints.lorkd_official import convert_lorkd_official

    run_command("convert_lorkd_official", lambda: convert_lorkd_official(cfg.ckpt_path, cfg.output_path, **_official(cfg)))

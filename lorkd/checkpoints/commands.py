"""Command lines with Hydra-style ``key=value`` arguments: ``lorkd-export`` and the released-checkpoint converter.

    lorkd-export ckpt_path=outputs/lorkd/checkpoints/last.ckpt out=exports/lorkd [regions=[abdomen,thorax]] [overwrite=true] [onnx=true]
    lorkd-export ckpt_path=lorkd-imbalance-pro.pth out=exports/lorkd-pro text_checkpoint=pro_text_encoder.pth \\
        language_model_path=/models/BioLORD-2023-C [student_preset=pro] [teacher_checkpoint=SAT_Pro.pth]
    python scripts/convert_lorkd_official.py ckpt_path=lorkd-imbalance-pro.pth out=lorkd-pro.ckpt \\
        text_checkpoint=pro_text_encoder.pth language_model_path=/models/BioLORD-2023-C
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lorkd.checkpoints.exported import ExportIntegrityError
from lorkd.checkpoints.report import CheckpointMismatchError

_USER_ERRORS = (FileExistsError, FileNotFoundError, KeyError, ValueError, CheckpointMismatchError, ExportIntegrityError)


def bool_argument(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _list(text: str) -> list[str]:
    """``[a,b]`` (Hydra list syntax) or ``a,b``."""
    return [item.strip().strip("'\"") for item in text.strip().strip("[]").split(",") if item.strip()]


def _parser(prog: str, description: str, out_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="our LoRKD checkpoint, or a released lorkd-imbalance-*.pth")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--text_checkpoint", help="released files: the paired {nano,pro}_text_encoder.pth")
    parser.add_argument("--language_model_path", help="released files: local BioLORD-2023-C folder (config + tokenizer)")
    parser.add_argument("--student_preset", choices=["nano", "pro"], help="released files: check the student architecture")
    parser.add_argument("--teacher_checkpoint", help="released files: the SAT vision file they were distilled from")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """``key=value`` -> ``--key=value`` for argparse (``--key value`` works too)."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [f"--{a}" if "=" in a and not a.startswith("-") else a for a in args]
    return {k: v for k, v in vars(parser.parse_args(args)).items() if v is not None}


def _official(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.pop(k) for k in ("text_checkpoint", "language_model_path", "student_preset", "teacher_checkpoint") if k in options}


def run_command(parser: argparse.ArgumentParser, job: Callable[[], Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(job())
    except _USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        parser.exit(1, f"{parser.prog}: error: {message}\n")


def export_main(argv: Sequence[str] | None = None) -> None:
    """``lorkd-export``: one merged standalone model per region + adapters (see lorkd.checkpoints.export)."""
    from lorkd.checkpoints.export import export_experts

    parser = _parser("lorkd-export", __doc__ or "", "export directory (created; replaced only with overwrite=true)")
    parser.add_argument("--regions", type=_list, help="experts to export, e.g. [abdomen,thorax] (default: all)")
    parser.add_argument("--overwrite", type=bool_argument, default=False, help="replace an earlier export at out")
    parser.add_argument("--onnx", type=bool_argument, default=False, help="also <region>/model.onnx (the onnx extra)")
    options = parse_arguments(parser, argv)
    official = _official(options)
    run_command(parser, lambda: export_experts(options.pop("ckpt_path"), options.pop("out"), **options, **official))


def convert_main(argv: Sequence[str] | None = None) -> None:
    """Released ``lorkd-imbalance-*.pth`` -> one of our LoRKD checkpoints (see lorkd.checkpoints.lorkd_official)."""
    from lorkd.checkpoints.lorkd_official import convert_lorkd_official

    parser = _parser("convert_lorkd_official", __doc__ or "", "LoRKD checkpoint to write (.ckpt)")
    options = parse_arguments(parser, argv)
    official = _official(options)
    if not (official.get("text_checkpoint") and official.get("language_model_path")):
        parser.error("text_checkpoint=... and language_model_path=... are required")
    run_command(parser, lambda: convert_lorkd_official(options["ckpt_path"], options["out"], **official))

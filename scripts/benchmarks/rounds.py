"""The command line shared by the benchmarks that time interleaved rounds in one process."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def parse_round_args(doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse ``--rounds`` (default 3), ``--threads`` (applied to torch here) and what ``add_arguments`` adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args

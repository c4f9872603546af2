"""How training reads and writes checkpoints: atomically in the run folder, and never by unpickling code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from lorkd.checkpoints.read import read_checkpoint
from lorkd.io import atomic_write


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for ``last.ckpt``, the best checkpoints and ``ckpt_path=`` resume.

    Saving goes through :func:`lorkd.io.atomic_write` (a temporary file in the checkpoint's own
    folder, fsync, rename, fsync of the folder): a kill or an error mid-write leaves the previous
    checkpoint intact. Lightning's default writes a temporary file under ``/tmp`` and, when that
    is another filesystem, copies it over the checkpoint without fsync. Loading always passes
    ``weights_only=True`` (whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` ask for), so a
    checkpoint that holds pickled code is refused instead of run.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, loaded onto the CPU with ``weights_only=True`` (``weights_only``
        and ``map_location`` are accepted for Lightning's interface; Lightning moves states itself)."""
        return read_checkpoint(path)

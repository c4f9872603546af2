"""The Python API: one typed function per job, images in and images out; the Hydra apps parse their
configs and call these (``lorkd.segment``, ``lorkd.load``, ``lorkd.evaluate``, ``lorkd.export``).

    import lorkd
    result = lorkd.segment("ct.nii.gz", ["liver", "spleen"], modality="ct", model="lorkd.ckpt")
    result.masks["liver"]          # nibabel uint8 mask in ct.nii.gz's grid (shape and affine)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lorkd.inference.predictor import Predictor


def load(
    model: str | Path,
    network: str = "experts",
    *,
    device: str | torch.device | None = None,
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    net_overrides: dict[str, Any] | None = None,
    attempts: int = 3,
    **options: Any,
) -> Predictor:
    """Load ``model`` once into a :class:`~lorkd.inference.predictor.Predictor` (predict many images with it).

    Args:
        model: our LoRKD or SAT checkpoint, an official SAT or released LoRKD file, or an export folder.
        network: ``"experts"`` (the LoRKD student with its region experts) or ``"teacher"``.
        device: where the network runs (None: CUDA when available, else the CPU).
        text_checkpoint, language_model_path, net_overrides: for official SAT files (their paired text
            encoder, local language model folder and architecture arguments not stored in them).
        attempts: loads of a fallback teacher read from another version of the file (rewritten between
            the two reads) before giving up: ``predictor.model.identity`` is that of the bytes loaded.
        options: :class:`~lorkd.inference.predictor.Predictor`'s options (``window``, ``threshold``,
            ``fallback``, ``runtime``, ...).
    """
    from lorkd.inference.predictor import Predictor

    for _ in range(attempts):
        predictor = Predictor.from_checkpoint(
            model,
            model=network,
            text_checkpoint=text_checkpoint,
            language_model_path=language_model_path,
            net_overrides=net_overrides,
            device=device,
            **options,
        )
        if predictor.teacher is None or predictor.teacher.identity == predictor.model.identity:
            return predictor
    raise OSError(f"{model} changed while it was read, {attempts} times: run again once it is written")

"""What a training batch carries from the loader's workers to the device, and what the model then gets.

Masks travel packed 8 to a byte (query ``q`` is bit ``q % 8`` of byte plane ``q // 8``): a 288x288x96
patch with 16 queries is 16 MB of bits instead of 509 MB of float32 masks. The image travels in the
data config's ``image_dtype`` (float16 halves it; its rounding, 2^-11 of the value, is below 1 HU of a
CT after SAT's normalisation). :func:`finish_batch` runs after the batch reached the device (the data
module's ``on_after_batch_transfer``): it applies the augmentation draws the batch carries and unpacks
the bits into the float32 ``masks`` the losses always saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lorkd.data.augment import apply_augment

IMAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def image_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a data config's ``image_dtype``."""
    if name not in IMAGE_DTYPES:
        raise ValueError(f"data.image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {name!r}")
    return IMAGE_DTYPES[name]


def packed_planes(n: int) -> int:
    """Byte planes holding ``n`` masks."""
    return (n + 7) // 8


def pack_bits(masks: Sequence[np.ndarray] | np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(ceil(n/8), *shape) uint8 planes of ``n`` binary (*shape) masks (nonzero = in the mask)."""
    bits = np.zeros((packed_planes(len(masks)), *shape), dtype=np.uint8)
    for q, mask in enumerate(masks):
        plane = bits[q // 8]
        plane |= (np.asarray(mask) != 0).view(np.uint8) << np.uint8(q % 8)
    return bits


def pack_label_window(window: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """:func:`pack_bits` of the masks ``window == id`` for each id of ``label_ids``, by one table look-up per
    byte plane (label-map ids do not overlap, so a voxel's byte is a function of its id)."""
    table = np.zeros((packed_planes(len(label_ids)), int(window.max(initial=0)) + 1), dtype=np.uint8)
    for q, label_id in enumerate(label_ids):
        if label_id < table.shape[1]:
            table[q // 8, label_id] |= np.uint8(1 << (q % 8))
    return np.stack([plane[window] for plane in table])


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ceil(n/8), *spatial) uint8 planes -> (B, n, *spatial) float32 masks of 0 and 1, where ``bits`` lies."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8).view(1, 1, 8, *[1] * (bits.ndim - 2))
    masks = (bits.unsqueeze(2) >> shifts) & 1  # (B, planes, 8, *spatial)
    return masks.flatten(1, 2)[:, :n].float()


def finish_batch(batch: Any) -> Any:
    """A collated training/validation batch as the model takes it: float32 image, augmented where the
    batch carries draws (``augment``), float32 ``masks`` from the packed ``mask_bits``. Other batches
    (test/predict cases) pass unchanged."""
    if not isinstance(batch, Mapping) or "mask_bits" not in batch:
        return batch
    batch = dict(batch)
    image, bits = batch.pop("image").float(), batch.pop("mask_bits")
    draws = batch.pop("augment", None)
    if draws is not None:
        image, bits = apply_augment(image, bits, draws)
    batch["image"] = image
    batch["masks"] = unpack_bits(bits, batch["query_mask"].shape[1])
    return batch

"""Size guards: an image whose grid cannot fit, or whose voxel size cannot be right, is refused before
any work, in one line naming the file, the numbers and the key that raises the limit.

Checked from the header alone (a NIfTI file's shape and affine; no voxel is read) before predict, eval
and training's preprocessing read an image, and again on the grid of every image preprocessed:

* ``max_input_voxels``: voxels of the image as stored (a 3.9 MB ``.nii.gz`` may claim 2000x2000x1000);
* ``max_resampled_voxels``: voxels of the grid at the target orientation and spacing (a 64^3 image of
  50 mm voxels asks for 1001x1001x668 at 1x1x3 mm);
* ``max_downsampling``: image voxels one resampled voxel spans along an axis (0.01 mm voxels at 1 mm
  span 100: the whole image would become a few voxels, and trilinear resampling reads 2 of them per axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lorkd.data.image_reader import CaseError

MAX_INPUT_VOXELS = 2**29  # 537M: 512x512x2048 (2 GiB as float32); a 512x512x1000 CT takes 262M
MAX_RESAMPLED_VOXELS = 2**28  # 268M at the target spacing (1 GiB per float32 map); 500x500x2000 mm at 1x1x3: 167M
MAX_DOWNSAMPLING = 20.0  # image voxels per resampled voxel along an axis (0.05 mm voxels at 1 mm)
LIMITS = ("max_input_voxels", "max_resampled_voxels", "max_downsampling")
RAISE_HINT = "data.preprocess.{key} (train.py) or inference.{key} (predict.py, eval.py)"


class SizeError(CaseError):
    """An image beyond a size guard; the message names the file, the numbers and the key to raise."""


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _hint(key: str) -> str:
    return f"raise {RAISE_HINT.format(key=key)} if it should run"


def check_input(name: str, shape: Sequence[int], max_voxels: int) -> None:
    """The image as stored has at most ``max_voxels`` voxels."""
    voxels = math.prod(int(s) for s in shape)
    if voxels > max_voxels:
        raise SizeError(
            f"{name}: {_shape(shape)} = {voxels:,} voxels ({4 * voxels / 2**30:.1f} GiB as float32), more than "
            f"max_input_voxels {max_voxels:,}; {_hint('max_input_voxels')}"
        )


def check_resampled(
    name: str,
    shape: Sequence[int],
    affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    max_voxels: int,
    max_downsampling: float,
) -> None:
    """The grid at the target spacing (``dst_affine``, ``dst_shape``) has at most ``max_voxels`` voxels,
    and none of its voxels spans more than ``max_downsampling`` image voxels along an axis."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    dst_spacing = np.linalg.norm(np.asarray(dst_affine, dtype=np.float64)[:3, :3], axis=0)
    sizes = f"{_shape(shape)} voxels of {'x'.join(f'{s:.4g}' for s in spacing)} mm"
    target = f"{'x'.join(f'{s:.4g}' for s in dst_spacing)} mm"
    voxels = math.prod(int(s) for s in dst_shape)
    if voxels > max_voxels:
        raise SizeError(
            f"{name}: {sizes} resample to {_shape(dst_shape)} = {voxels:,} voxels at {target}, more than "
            f"max_resampled_voxels {max_voxels:,} (check the header's voxel size); "
            f"{_hint('max_resampled_voxels')}"
        )
    xform = np.linalg.solve(np.asarray(affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64))
    spans = np.linalg.norm(xform[:3, :3], axis=0)  # image voxels crossed by one step along each grid axis
    if spans.max() > max_downsampling:
        raise SizeError(
            f"{name}: one voxel of {target} spans {'x'.join(f'{s:.4g}' for s in spans)} of its {sizes} "
            f"(a field of view of {'x'.join(f'{s:.4g}' for s in spacing * np.asarray(shape))} mm): more than "
            f"max_downsampling {max_downsampling:g}; check the header's voxel size (mm), or "
            f"{_hint('max_downsampling')}"
        )

"""The body in a preprocessed scan: where a segmentation may lie.

After SAT's intensity normalisation (clip, then z-score) the scan's background (air, a zero-filled
field of view) sits at the clip's lower bound, ``InversionInfo.background`` (CT: -500 HU; MRI/PET:
the 0.5th percentile, i.e. 0 in a zero-background scan). The body is what lies above it, with the
holes of each axial slice filled (lungs, bowel gas, a dark skull) and grown by a margin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def body_mask(image: np.ndarray, background: float, margin: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Boolean (X, Y, Z) body of a normalised (X, Y, Z) image: voxels above ``background``, holes filled
    per slice of the last axis (axial in RAS), dilated by ``margin`` voxels per axis (a box)."""
    from scipy import ndimage  # 0.4 s to import: only once a prediction needs its body

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"body_mask expects an (X, Y, Z) image, got shape {image.shape}")
    body = image > background
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    size = tuple(2 * max(int(m), 0) + 1 for m in margin)
    if any(s > 1 for s in size) and body.any():
        body = ndimage.maximum_filter(body, size=size, mode="constant", cval=False)
    return body

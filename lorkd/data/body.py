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
    body = _filled(image > background)
    size = tuple(2 * max(int(m), 0) + 1 for m in margin)
    if any(s > 1 for s in size) and body.any():
        body = ndimage.maximum_filter(body, size=size, mode="constant", cval=False)
    return body


def _filled(body: np.ndarray) -> np.ndarray:
    """``body`` with the holes of each slice of the last axis filled (``ndimage.binary_fill_holes`` per
    slice): the background of a slice is what 4-connects to the slice's edge; one labelling of the volume
    (parts connected within a slice only) finds it, 3x faster than filling slice by slice."""
    from scipy import ndimage

    in_slice = np.zeros((3, 3, 3), dtype=bool)
    in_slice[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    parts, count = ndimage.label(~body, structure=in_slice)
    edges = np.concatenate([parts[0].ravel(), parts[-1].ravel(), parts[:, 0].ravel(), parts[:, -1].ravel()])
    outside = np.zeros(count + 1, dtype=bool)
    outside[edges] = True
    outside[0] = False  # the body itself
    return ~outside[parts]

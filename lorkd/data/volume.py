"""What a reader returns: a 3-D volume with its affine, and the error of a case whose file cannot be used.

Shared by :mod:`lorkd.data.image_reader` (the one reader) and :mod:`lorkd.data.dicom` (DICOM series), which
:mod:`lorkd.data.image_reader` calls: this module imports neither, so the two import no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class CaseError(ValueError):
    """A case whose image or mask cannot be used; the message names the file and the problem."""


@dataclass
class Volume:
    """A 3-D array with its voxel-to-world (RAS mm) affine."""

    data: np.ndarray
    affine: np.ndarray
    name: str

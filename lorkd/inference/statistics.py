"""Per-label statistics of a prediction (``writer.statistics=true`` writes them as ``statistics.json``).

For each label: voxels, volume (ml) and the mean / standard deviation / min / max of the input's
intensities inside the mask, in the input's own units (Hounsfield units for CT: NIfTI values as
stored, DICOM values after the rescale slope and intercept). An empty mask has ``null`` intensities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from lorkd.inference.predictor import Prediction

STATISTICS = "statistics.json"


def voxel_volume_ml(image: nib.spatialimages.SpatialImage) -> float:
    """The volume of one voxel of ``image`` in millilitres."""
    return float(abs(np.linalg.det(np.asarray(image.affine)[:3, :3]))) / 1000.0


def label_statistics(prediction: Prediction) -> dict[str, Any]:
    """``{"modality", "unit", "voxel_volume_ml", "labels": {label: {voxels, volume_ml, mean, std, min, max}}}``."""
    image = np.asarray(prediction.image.dataobj, dtype=np.float32)
    ml = voxel_volume_ml(prediction.image)
    labels: dict[str, dict[str, Any]] = {}
    for label in prediction.labels:
        values = image[np.asarray(prediction.masks[label].dataobj).astype(bool)].astype(np.float64)
        found = values.size > 0
        labels[label] = {
            "voxels": int(values.size),
            "volume_ml": round(values.size * ml, 4),
            "mean": float(values.mean()) if found else None,
            "std": float(values.std()) if found else None,
            "min": float(values.min()) if found else None,
            "max": float(values.max()) if found else None,
        }
    return {
        "modality": prediction.modality,
        "unit": "HU" if prediction.modality == "ct" else "image intensity",
        "voxel_volume_ml": ml,
        "labels": labels,
    }

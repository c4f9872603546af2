"""Write a prediction of a DICOM series as a DICOM Segmentation (``writer.format=dicom_seg``; highdicom).

``segmentation.dcm`` is a binary Segmentation object referencing every image of the source series
(one frame per source slice and segment, so segments may overlap), one segment per label: its
name as SegmentLabel and a SNOMED CT property type where the label names one exactly (``liver`` ->
10200004), else the generic "Anatomical Structure" (lesions: "Morphologically Abnormal Structure").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.dicom import series_headers
from lorkd.data.io import CaseError
from lorkd.inference.predictor import Prediction

DICOM_SEG = "segmentation.dcm"
FORMATS = ("nifti", "dicom_seg")
_ABNORMAL_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "cyst", "neoplasm", "carcinoma")


def check_format(format: str, images: Sequence[Path]) -> None:
    """``dicom_seg`` needs every input to be a DICOM series folder; raise listing the others."""
    if format not in FORMATS:
        raise ValueError(f"writer.format must be one of {FORMATS}, got {format!r}")
    if format == "dicom_seg":
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise ValueError('writer.format=dicom_seg needs the dicom extra: pip install -e ".[dicom]"') from None
        others = [str(p) for p in images if not Path(p).is_dir()]
        if others:
            raise ValueError(
                f"writer.format=dicom_seg needs DICOM series inputs; {len(others)} input(s) are files "
                f"(e.g. {others[0]}): use writer.format=nifti for them"
            )


def _codes(label: str) -> tuple[Any, Any]:
    """(category, property type) codes of a label: SNOMED CT where the name is one, else generic."""
    from pydicom.sr.codedict import codes

    abnormal = any(word in label for word in _ABNORMAL_WORDS)
    category = codes.SCT.MorphologicallyAbnormalStructure if abnormal else codes.SCT.AnatomicalStructure
    keyword = "".join(word.capitalize() for word in label.split())
    try:
        found = getattr(codes.SCT, keyword)
    except AttributeError:
        return category, category
    return category, (found if found.meaning.lower() == label.lower() else category)


def segment_descriptions(labels: Sequence[str], software: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="LoRKD", version=software, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, label in enumerate(labels, start=1):
        category, property_type = _codes(label)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def frames(prediction: Prediction, shape: tuple[int, int, int]) -> np.ndarray:
    """(slices, rows, columns, labels) uint8 masks in source-slice order from (column, row, slice) arrays."""
    stack = []
    for label in prediction.labels:
        mask = np.asarray(prediction.masks[label].dataobj)
        if mask.shape != shape:
            raise CaseError(f"mask of {label!r} has shape {mask.shape}, the DICOM series {shape}")
        stack.append(np.transpose(mask, (2, 1, 0)))
    return np.stack(stack, axis=-1).astype(np.uint8)


def write_dicom_seg(prediction: Prediction, source: str | Path, path: str | Path) -> Path:
    """Write ``prediction`` of the series in folder ``source`` as a DICOM Segmentation at ``path``
    (a plain write: the case writer hands it a temporary file that it renames)."""
    from importlib.metadata import version

    import highdicom as hd

    software = version("lorkd")
    headers = series_headers(source)
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    segmentation = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames(prediction, shape),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(prediction.labels, software),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(headers[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="LoRKD",
        manufacturer_model_name="LoRKD region experts",
        software_versions=software,
        device_serial_number="0",
        series_description="LoRKD segmentation",
        omit_empty_frames=False,
    )
    segmentation.save_as(str(path))
    return Path(path)

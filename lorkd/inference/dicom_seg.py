"""Write a prediction of a DICOM series as a DICOM Segmentation (``writer.format=dicom_seg``; highdicom).

``segmentation.dcm`` is a binary Segmentation object referencing every image of the source series
(one frame per source slice and segment, so segments may overlap), one segment per label: its
name as SegmentLabel (in UTF-8, SpecificCharacterSet ``ISO_IR 192``, so any name reads back as
written; a name over LO's 64 characters is cut there and given whole as SegmentDescription) and the
SNOMED CT codes of :mod:`lorkd.inference.segment_codes`. ContentCreatorName is ``LoRKD^``.
What the writer needs of the series (one study, one frame of reference, image UIDs) is checked
before the case is predicted (:func:`check_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.dicom import series_headers
from lorkd.data.image_reader import CaseError
from lorkd.inference.predictor import Prediction
from lorkd.inference.segment_codes import segment_codes

DICOM_SEG = "segmentation.dcm"
FORMATS = ("nifti", "dicom_seg")
CHARACTER_SET = "ISO_IR 192"  # UTF-8
CREATOR = "LoRKD^"  # a one-component person name (the trailing caret says so)
LABEL_LENGTH = 64  # characters of an LO value (SegmentLabel)
# what highdicom reads of every source image: present in each, and one value in the whole series
_SAME = ("StudyInstanceUID", "FrameOfReferenceUID")
_PRESENT = ("SOPClassUID", "SOPInstanceUID", *_SAME)
# type 2 patient and study attributes the Segmentation copies from the first image (empty when absent)
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")


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


def check_source(folder: str | Path) -> list[Any]:
    """The sorted headers of the series in ``folder`` when a Segmentation can reference it (see
    :func:`~lorkd.data.dicom.series_headers`, and one StudyInstanceUID and FrameOfReferenceUID, every
    image with its SOP UIDs); else :class:`CaseError` naming the folder, the attribute and two files."""
    headers = series_headers(folder)
    for key in _PRESENT:
        missing = [Path(h.filename).name for h in headers if not str(h.get(key, "") or "")]
        if missing:
            raise CaseError(
                f"{folder}: {len(missing)} image(s) without {key} (e.g. {missing[0]}); a DICOM Segmentation "
                "must reference it (writer.format=dicom_seg), use writer.format=nifti for this series"
            )
    for key in _SAME:
        first = {}
        for header in headers:
            first.setdefault(str(header.get(key)), Path(header.filename).name)
        if len(first) > 1:
            (a, file_a), (b, file_b) = list(first.items())[:2]
            raise CaseError(
                f"{folder}: {key} differs between slices ({file_a}: {a}, {file_b}: {b}); a DICOM Segmentation "
                "references one study and frame of reference (writer.format=dicom_seg): put each in its own folder"
            )
    return headers


def segment_descriptions(labels: Sequence[str], software: str) -> list[Any]:
    """One highdicom segment description per label, numbered from 1 in order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="LoRKD", version=software, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, label in enumerate(labels, start=1):
        coded = segment_codes(label)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:LABEL_LENGTH],
            segmented_property_category=coded.category,
            segmented_property_type=coded.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=None if coded.region is None else [coded.region],
        )
        if coded.modifier is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(coded.modifier)]
        if len(label) > LABEL_LENGTH:
            description.SegmentDescription = label
        descriptions.append(description)
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
    headers = check_source(source)
    for key in _TYPE2:
        if key not in headers[0]:
            setattr(headers[0], key, None)
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
        content_creator_name=CREATOR,
        specific_character_set=CHARACTER_SET,
    )
    segmentation.save_as(str(path))
    return Path(path)

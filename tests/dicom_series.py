"""Write a DICOM CT series from a volume and its RAS affine (pydicom), the way scanners store one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INTERCEPT = -1024.0


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    series_uid: str | None = None,
    seed: int = 0,
    slope: float = 1.0,
    intercept: float = INTERCEPT,
) -> list[Path]:
    """One file per slice ``volume[:, :, k]`` (HU), named in shuffled order; returns the files.

    Stored values are ``(volume - intercept) / slope``, which must be integers in 0..65535. The array is indexed
    (column, row, slice) as :mod:`lorkd.data.dicom` reads it back.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    column_spacing, row_spacing = (float(np.linalg.norm(lps[:3, i])) for i in (0, 1))
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    stored = (np.asarray(volume, dtype=np.float64) - intercept) / slope
    if np.any(stored != np.round(stored)) or stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"(volume - {intercept}) / {slope} is not a uint16 array")
    stored = stored.astype(np.uint16)
    order = np.random.default_rng(seed).permutation(volume.shape[2])  # file names do not follow positions
    files = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "LORKD-TEST", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "20260101", "120000", "A1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.Manufacturer = "LoRKD tests"
        ds.ImageOrientationPatient = [round(v, 8) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [round(row_spacing, 6), round(column_spacing, 6)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"IM{order[k]:04d}"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files

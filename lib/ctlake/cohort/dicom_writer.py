"""Image geometry and writing one patient's series as CT Image Storage DICOM files.

Geometry is fixed once, as the numbers written to the headers: pixel (row,
col) of the slice at z has its centre at world x = ImagePositionPatient[0] +
col * PixelSpacing, y = ImagePositionPatient[1] + row * PixelSpacing, z =
ImagePositionPatient[2] (mm, patient LPS axes, ImageOrientationPatient
1,0,0,0,1,0).  Every coordinate in the cohort CSVs is computed from these
written values, so they agree with what a reader of the files computes.

Pixels are stored as unsigned 12-bit values, stored = HU + 1024 clipped to
0..4095, with RescaleSlope 1 and RescaleIntercept -1024.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from ctlake.cohort.anatomy import Grid

RESCALE_INTERCEPT = -1024
MAX_STORED = 4095
#: Lung window then mediastinal window (HU), as scanners usually ship them.
WINDOW_CENTER = (-600, 40)
WINDOW_WIDTH = (1500, 400)


def ds_number(value: float) -> str:
    """A decimal string (DICOM DS, at most 16 characters) with up to 6 decimals."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def exact(value: float) -> float:
    """The float that a DS value written by :func:`ds_number` reads back as."""
    return float(ds_number(value))


def image_grid(matrix: int, spacing_mm: float) -> Grid:
    """The pixel grid of a ``matrix`` x ``matrix`` image centred on the table axis (x = y = 0)."""
    spacing = exact(spacing_mm)
    origin = exact(-(matrix - 1) / 2 * spacing)
    return Grid(matrix=matrix, spacing=spacing, x0=origin, y0=origin)


def pixel_to_world(grid: Grid, z_mm: float, row: float, col: float) -> tuple[float, float, float]:
    """World (x, y, z) mm of pixel (row, col), fractional allowed, on the slice at ``z_mm``."""
    x, y = grid.world(row, col)
    return float(x), float(y), float(z_mm)


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """HU to the stored unsigned 12-bit values: round(HU) + 1024, clipped to 0..4095, uint16."""
    return np.clip(np.rint(hu) - RESCALE_INTERCEPT, 0, MAX_STORED).astype(np.uint16)


def series_uids(*entropy: object) -> dict:
    """Deterministic study, series and frame-of-reference UIDs from the given entropy sources."""
    sources = [str(e) for e in entropy]
    return {name: generate_uid(entropy_srcs=sources + [name])
            for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}


def write_series(volume_hu: np.ndarray, grid: Grid, z_positions: np.ndarray, slice_thickness: float,
                 identity: dict, uids: dict, folder: Path, rle: bool = False) -> list[Path]:
    """Write one file per slice, ``<folder>/<NNNN>.dcm``, in ascending z; returns the paths.

    ``identity`` holds the patient and study attributes (see
    :func:`ctlake.cohort.identity.fake_identity`); ``rle`` writes RLE Lossless
    instead of explicit VR little endian.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (plane, z) in enumerate(zip(volume_hu, z_positions), start=1):
        sop_uid = generate_uid(entropy_srcs=[uids["SeriesInstanceUID"], "SOPInstanceUID", str(k)])
        ds = _slice_dataset(identity, uids, sop_uid, grid, float(z), slice_thickness, k)
        ds.PixelData = hu_to_stored(plane).tobytes()
        if rle:
            # Keep the deterministic UID: compress() would otherwise mint a random one.
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(identity: dict, uids: dict, sop_uid: str, grid: Grid, z: float, thickness: float,
                   instance: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, identity["StudyDate"])
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, keyword, identity["StudyTime"])
    ds.AccessionNumber = identity["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = identity["Manufacturer"]
    ds.ManufacturerModelName = identity["ManufacturerModelName"]
    ds.InstitutionName = identity["InstitutionName"]
    ds.InstitutionAddress = identity["InstitutionAddress"]
    ds.ReferringPhysicianName = identity["ReferringPhysicianName"]
    ds.StudyDescription = "CT CHEST WO CONTRAST"
    ds.SeriesDescription = "AXIAL LUNG"
    ds.OperatorsName = identity["OperatorsName"]
    ds.PatientName = identity["PatientName"]
    ds.PatientID = identity["PatientID"]
    ds.IssuerOfPatientID = identity["IssuerOfPatientID"]
    ds.PatientBirthDate = identity["PatientBirthDate"]
    ds.PatientSex = identity["PatientSex"]
    ds.OtherPatientIDs = identity["OtherPatientIDs"]
    ds.PatientAge = identity["PatientAge"]
    ds.PatientAddress = identity["PatientAddress"]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = ds_number(thickness)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["StudyInstanceUID"]
    ds.SeriesInstanceUID = uids["SeriesInstanceUID"]
    ds.StudyID = identity["StudyID"]
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [ds_number(grid.x0), ds_number(grid.y0), ds_number(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = ds_number(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.matrix
    ds.Columns = grid.matrix
    ds.PixelSpacing = [ds_number(grid.spacing), ds_number(grid.spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = [str(v) for v in WINDOW_CENTER]
    ds.WindowWidth = [str(v) for v in WINDOW_WIDTH]
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


"""Real DICOM files shipped by pydicom and pydicom-data, and broken files derived from them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def real(name: str) -> Path:
    """A file from pydicom's test data (pydicom-data supplies the larger CT files)."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return Path(path)


def pydicom_test_folder() -> Path:
    return real("CT_small.dcm").parent


def _modified_ct_small(folder: Path, name: str, change) -> Path:
    ds = pydicom.dcmread(real("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    change(ds)
    path = folder / name
    ds.save_as(path, enforce_file_format=False)
    return path


def build_mixed_folder(folder: Path) -> dict[str, str]:
    """Write one file per expected outcome; return {file name: expected outcome}.

    Outcomes are ``slices:<n frames>`` or a quarantine reason.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def copy(name: str, outcome: str, target: str | None = None):
        shutil.copy(real(name), folder / (target or name))
        expected[target or name] = outcome

    copy("CT_small.dcm", "slices:1")                   # explicit VR little endian
    copy("693_J2KR.dcm", "slices:1")                   # JPEG 2000 lossless, 512x512
    copy("693_UNCR.dcm", "duplicate")                  # same SOP instance as 693_J2KR, sorts after it
    copy("bad_sequence.dcm", "slices:1")               # JPEG lossless process 14
    copy("eCT_Supplemental.dcm", "slices:2")           # Enhanced CT, two frames
    copy("explicit_VR-UN.dcm", "slices:1")             # elements with VR UN
    copy("MR_small.dcm", "not_ct")
    copy("CT_small.dcm", "duplicate", target="zz_copy_of_ct_small.dcm")

    content = real("693_UNCI.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(content[: len(content) // 2])
    expected["truncated.dcm"] = "truncated"
    (folder / "random.bin").write_bytes(os.urandom(4096))
    expected["random.bin"] = "not_dicom"
    (folder / "empty.dcm").write_bytes(b"")
    expected["empty.dcm"] = "not_dicom"

    _modified_ct_small(folder, "no_pixels.dcm", lambda ds: delattr(ds, "PixelData"))
    expected["no_pixels.dcm"] = "no_pixel_data"

    def skew(ds):
        ds.ImageOrientationPatient = [1, 0, 0, 0.5, 0.5, 0]
    _modified_ct_small(folder, "skewed.dcm", skew)
    expected["skewed.dcm"] = "bad_geometry"
    return expected

"""Real DICOM files shipped by pydicom and pydicom-data, and broken files derived from them."""
from __future__ import annotations

import os
import shutil
import struct
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


def build_hostile_folder(folder: Path, zeros_bytes: int = 40 * 2**20) -> dict[str, str]:
    """Files crafted to cost a worker memory or time, or to carry identity in their pixels: {name: outcome}.

    Each must end in its quarantine reason from its header alone (the caps are
    ``ctlake.core.dicom_parse.ParsePolicy``'s defaults).
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import EnhancedCTImageStorage, RLELossless, SecondaryCaptureImageStorage

    folder.mkdir(parents=True, exist_ok=True)

    def rle_huge(ds):
        # 1 KB on disk, 65535 x 65535 x 16 bits declared: 8.6 GB if decoded.
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.Rows = ds.Columns = 65535
        # A valid RLE header (2 segments, the high and low bytes) over 2 literal bytes: decoders
        # allocate the whole declared frame before they find the segments short.
        header = struct.pack("<16I", 2, 64, 66, *[0] * 13)
        ds.PixelData = encapsulate([header + b"\x00\x00" + b"\x00\x00"])
        ds["PixelData"].VR = "OB"

    def many_frames(ds):
        # Consistent: 1 x 1 pixels, 100000 frames and exactly their bytes. 100000 rows if accepted.
        ds.SOPClassUID = EnhancedCTImageStorage
        ds.Rows = ds.Columns = 1
        ds.NumberOfFrames = 100_000
        ds.PixelData = bytes(2 * 100_000)

    def frames_in_ct_image(ds):
        ds.NumberOfFrames = 3
        ds.PixelData = ds.PixelData * 3

    def burned_in(ds):
        ds.BurnedInAnnotation = "YES"

    def secondary_capture(ds):
        ds.SOPClassUID = SecondaryCaptureImageStorage

    def derived(ds):
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

    def screen_save(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "SCREEN SAVE"]

    expected = {}
    for name, change, outcome in (
            ("rle_65535x65535.dcm", rle_huge, "too_large_decoded"),
            ("enhanced_1x1_100000_frames.dcm", many_frames, "too_large_decoded"),
            ("ct_image_with_3_frames.dcm", frames_in_ct_image, "unsupported_pixels"),
            ("burned_in_annotation.dcm", burned_in, "burned_in_annotation"),
            ("secondary_capture_modality_ct.dcm", secondary_capture, "secondary_image"),
            ("derived_secondary.dcm", derived, "secondary_image"),
            ("screen_save.dcm", screen_save, "secondary_image")):
        _modified_ct_small(folder, name, change)
        expected[name] = outcome
    with open(folder / "zeros.dcm", "wb") as handle:
        handle.truncate(zeros_bytes)
    expected["zeros.dcm"] = "not_dicom"
    return expected


def copies_of_a_real_ct(folder: Path, count: int, entropy: str) -> None:
    """``count`` JPEG 2000 512x512 CT slices (real pixels, new SOP instances): seconds of decoding per core."""
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(real("693_J2KR.dcm"))
    series = generate_uid(entropy_srcs=[entropy])
    for index in range(count):
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[entropy, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.save_as(folder / f"slice_{index:04d}.dcm", enforce_file_format=False)

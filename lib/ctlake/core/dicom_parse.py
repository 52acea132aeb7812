"""Turn the bytes of one DICOM file into de-identified slice records, or a quarantine reason.

Pure Python (pydicom + numpy), no Spark: the ingestion job calls
:func:`parse_dicom` inside a pandas UDF on the executors, and tests call it
directly on real files.  A file yields either one record per image frame
(Enhanced multi-frame CT gives several) or exactly one :class:`Rejection`;
nothing raises for a bad file.

A file is hostile until its header says otherwise: what it would cost to
decode is decided from the header before any pixel is touched
(:class:`ParsePolicy`), bytes that cannot start a DICOM file are turned away
without being parsed, and objects whose pixels may show identity (burned-in
annotation, screen captures) are refused unless configuration accepts them.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ctlake.core.deid import IDENTIFYING_ATTRIBUTES

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

#: Parts of ImageType that mark a picture of something rather than an acquired CT image.
SECONDARY_IMAGE_TYPES = ("SECONDARY", "SCREEN SAVE")

#: Quarantine reason classes, in the order a file is checked.
REASONS = (
    "too_large",          # bigger than the reader accepts; never opened
    "hidden_file",        # a name Spark's file sources skip (leading . or _); never opened
    "not_dicom",          # empty, or no DICOM preamble and not a parseable raw dataset
    "truncated",          # the file ends before its declared content does
    "unreadable_header",  # the header does not parse for another reason
    "not_ct",             # a valid DICOM object but not a CT image
    "burned_in_annotation",  # BurnedInAnnotation YES: text (a name, a date) may be in the pixels
    "secondary_image",    # Modality CT outside the CT image storage classes, or ImageType SECONDARY / SCREEN SAVE
    "too_large_decoded",  # Rows x Columns x Frames x BitsAllocated over the cap; never decoded
    "no_pixel_data",      # a CT header without pixels
    "unsupported_pixels", # colour or floating-point pixels, which CT does not use
    "decode_failed",      # the transfer syntax could not be decoded
    "bad_geometry",       # missing or inconsistent position, orientation or spacing
    "duplicate",          # an SOP instance and frame already ingested from another file
)

#: Orientation cosines must be unit length and orthogonal to this tolerance.
_ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ParsePolicy:
    """What a file may cost and show before it is refused.

    ``max_decoded_bytes`` caps Rows x Columns x Frames x BitsAllocated / 8 x
    SamplesPerPixel as the header declares it: a 1 KB RLE file declaring
    65535 x 65535 pixels would otherwise allocate 8.6 GB before failing.
    Decoding takes about three times the declared size at its peak (the
    stored array, the HU array and the record bytes).  ``max_frames`` caps
    the rows one file can become.
    """

    max_decoded_bytes: int = 1 << 30
    max_frames: int = 5000
    accept_burned_in_annotation: bool = False
    accept_secondary_images: bool = False


@dataclass(frozen=True)
class Rejection:
    """Why a file is quarantined, with what is known of it that identifies no one."""

    reason: str
    message: str
    sop_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    transfer_syntax: str | None = None


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _retain(uid: str | None) -> str | None:
    return uid


def parse_dicom(content: bytes, pseudonymize: Callable[[str | None, str], str],
                policy: ParsePolicy = ParsePolicy(),
                uids: Callable[[str | None], str | None] | None = None) -> list[dict] | Rejection:
    """Parse one file: a list of frame records (see ``SLICES_SCHEMA``) or a Rejection.

    Parameters
    ----------
    content : bytes
        The whole file.
    pseudonymize : callable
        ``(patient_id, study_uid) -> pseudonym``; the raw Patient ID never
        leaves this function.
    policy : ParsePolicy
        The caps and what is accepted beyond acquired CT images.
    uids : callable, optional
        What the study, series, SOP instance and frame of reference UIDs
        become, for example :class:`ctlake.core.deid.UidReplacer`; None keeps
        them (PS3.15 Retain UIDs Option).

    Returns
    -------
    list of dict or Rejection
        Frame records carry HU pixels as little-endian int16 bytes, C order.
    """
    ds, uids = None, uids or _retain
    try:
        ds = _read(content)
        _check_ct(ds, policy)
        _check_cost(ds, policy)
        frames_hu = _decode_hu(ds)
        return _records(ds, frames_hu, pseudonymize, uids)
    except _Reject as exc:
        return _rejection(exc.reason, str(exc), ds, uids)
    except MemoryError:
        # The worker's address space is capped (ingest.worker_address_space): the file, not the run, fails.
        return _rejection("too_large_decoded", "decoding ran out of the Python worker's memory "
                          "(ingest.worker_address_space)", ds, uids)
    except Exception as exc:  # any other failure is still a value, never a crashed task
        return _rejection("unreadable_header", f"{type(exc).__name__}: {exc}", ds, uids)


def could_start_dicom(content: bytes) -> bool:
    """A preamble and ``DICM``, or a first element of group 0002 or 0008 (a raw dataset), either byte order.

    Decided from the first bytes: forcing pydicom through a 200 MB file of
    zeros took 209 s to call it not DICOM.
    """
    if content[128:132] == b"DICM":
        return True
    return len(content) >= 8 and (int.from_bytes(content[:2], "little") in (0x0002, 0x0008)
                                  or int.from_bytes(content[:2], "big") == 0x0008)


def read_file(path: str) -> bytes:
    """A local file's bytes, or only its first 132 when they cannot start a DICOM file.

    :func:`parse_dicom` calls such a prefix ``not_dicom`` exactly as it would
    the whole file, without a 200 MB file of zeros ever being read.
    """
    with open(path, "rb") as handle:
        content = handle.read(132)
        if could_start_dicom(content):
            content += handle.read()
    return content


def _read(content: bytes) -> pydicom.Dataset:
    if not could_start_dicom(content):
        raise _Reject("not_dicom", "no DICOM preamble and no plausible first element")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(content))
        except InvalidDicomError:
            # Files written without the 128-byte preamble are common in the wild; try once more.
            try:
                ds = pydicom.dcmread(io.BytesIO(content), force=True)
            except Exception as exc:
                raise _Reject("not_dicom", f"not a DICOM file: {exc}") from exc
            if len(ds) == 0 or not any(tag.group == 0x0008 for tag in ds.keys()):
                raise _Reject("not_dicom", "no DICOM preamble and no recognizable DICOM header") from None
        except (EOFError, OSError) as exc:
            raise _Reject("truncated", f"file ends inside its header: {exc}") from exc
        except Exception as exc:
            reason = "truncated" if _looks_truncated(str(exc)) else "unreadable_header"
            raise _Reject(reason, f"{type(exc).__name__}: {exc}") from exc
        # Parsing is lazy: touch every element now so a damaged header is caught here.
        try:
            for _ in ds.iterall():
                pass
        except Exception as exc:
            reason = "truncated" if _looks_truncated(str(exc)) else "unreadable_header"
            raise _Reject(reason, f"{type(exc).__name__}: {exc}") from exc
    return ds


def _looks_truncated(message: str) -> bool:
    message = message.lower()
    return any(s in message for s in ("ended unexpectedly", "eof", "end of file", "truncat",
                                      "expected length", "doesn't match the expected", "less than expected", "insufficient",
                                      "not enough", "buffer is too small", "too short"))


def _check_ct(ds: pydicom.Dataset, policy: ParsePolicy) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if sop_class not in CT_SOP_CLASSES and modality != "CT":
        what = modality or "no Modality"
        raise _Reject("not_ct", f"modality {what}, SOP class {sop_class or 'missing'}: not a CT image")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" and not policy.accept_burned_in_annotation:
        raise _Reject("burned_in_annotation", "BurnedInAnnotation YES: the pixels may show identifying text "
                      "(ingest.accept_burned_in_annotation accepts it)")
    image_type = [str(v).strip().upper() for v in _values(ds.get("ImageType"))]
    secondary = [t for t in SECONDARY_IMAGE_TYPES if t in image_type]
    if (sop_class not in CT_SOP_CLASSES or secondary) and not policy.accept_secondary_images:
        why = (f"ImageType {'/'.join(secondary)}" if secondary
               else f"SOP class {sop_class or 'missing'} is not a CT image storage class")
        raise _Reject("secondary_image", f"{why}: a picture of an image, which may carry burned-in identity "
                      "(ingest.accept_secondary_images accepts it)")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Reject("no_pixel_data", "CT header without Pixel Data")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise _Reject("unsupported_pixels", "floating-point pixel data is not CT")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise _Reject("unsupported_pixels", f"{samples} samples per pixel, {photometric}: CT is monochrome")


def _values(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _check_cost(ds: pydicom.Dataset, policy: ParsePolicy) -> None:
    """Refuse, from the header alone, a file whose pixels would cost more than the policy allows."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated") or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise _Reject("unreadable_header", f"matrix size is not a number: {exc}") from exc
    if min(rows, cols, frames, bits, samples) <= 0:
        raise _Reject("bad_geometry", f"matrix {rows} x {cols}, {frames} frames, {bits} bits: not an image")
    if frames > 1 and str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.2":
        raise _Reject("unsupported_pixels", f"{frames} frames in a CT Image Storage object, which holds one; "
                      "multi-frame CT is Enhanced CT")
    if frames > policy.max_frames:
        raise _Reject("too_large_decoded", f"{frames} frames declared, over ingest.max_frames {policy.max_frames}")
    declared = rows * cols * frames * samples * ((bits + 7) // 8)
    if declared > policy.max_decoded_bytes:
        raise _Reject("too_large_decoded", f"{rows} x {cols} x {frames} frames at {bits} bits declare {declared} "
                      f"bytes decoded, over ingest.max_decoded_bytes {policy.max_decoded_bytes}")


def _decode_hu(ds: pydicom.Dataset) -> np.ndarray:
    """All frames as int16 Hounsfield units, shape (frames, rows, columns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stored = ds.pixel_array
        except MemoryError:
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            reason = "truncated" if _looks_truncated(text) else "decode_failed"
            syntax = _transfer_syntax(ds) or "unknown transfer syntax"
            raise _Reject(reason, f"cannot decode pixels ({syntax}): {text}") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    stored = stored.reshape(n_frames, *stored.shape[-2:])
    rows, cols = int(ds.Rows), int(ds.Columns)
    if stored.shape[1:] != (rows, cols):
        raise _Reject("bad_geometry", f"pixel matrix {stored.shape[1:]} differs from Rows x Columns {(rows, cols)}")
    hu = np.empty(stored.shape, dtype=np.int16)
    for index in range(n_frames):
        slope, intercept = _rescale(ds, index)
        if not _rescale_integral(stored[index], slope, intercept, out=hu[index]):
            frame = stored[index].astype(np.float32) * slope + intercept
            hu[index] = np.clip(np.rint(frame), -32768, 32767).astype(np.int16)
    return hu


def _rescale_integral(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> bool:
    """Write HU = stored + intercept into ``out`` (int16) in integer arithmetic; False if not applicable.

    Typical CT (slope 1, integral intercept, integer pixels whose HU fits int16) takes this path,
    several times faster than the float32 rescale, rint and clip that handles everything else.
    It gives identical values: integer pixels plus an integral intercept are exact integers in
    float32 (|value| < 2**24), so rint changes nothing, and with the range checked neither does clip.
    """
    if (slope != 1.0 or not float(intercept).is_integer() or not -32768 <= intercept <= 32767
            or stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2 or stored.size == 0):
        return False
    low, high = int(stored.min()), int(stored.max())
    offset = int(intercept)
    # Both the stored values and the results must fit int16 for the in-place int16 sum to be exact.
    if low < -32768 or high > 32767 or low + offset < -32768 or high + offset > 32767:
        return False
    out[...] = stored
    out += np.int16(offset)
    return True


def _frame_value(ds: pydicom.Dataset, index: int, sequence: str, attribute: str):
    """An attribute of frame ``index``: top level, else per-frame, else shared functional groups."""
    if attribute in ds:
        return ds.get(attribute)
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        item = items[index] if groups.startswith("PerFrame") and index < len(items) else items[0]
        inner = item.get(sequence)
        if inner and attribute in inner[0]:
            return inner[0].get(attribute)
    return None


def _rescale(ds: pydicom.Dataset, index: int) -> tuple[float, float]:
    slope = _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


def _floats(value, count: int, name: str) -> list[float]:
    if value is None or value == "":
        raise _Reject("bad_geometry", f"missing {name}")
    values = [float(v) for v in _values(value)]
    if len(values) != count or not all(np.isfinite(values)):
        raise _Reject("bad_geometry", f"{name} must hold {count} finite numbers, found {len(values)}")
    return values


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _geometry(ds: pydicom.Dataset, index: int) -> dict:
    position = _floats(_frame_value(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3,
                       "ImagePositionPatient")
    orientation = _floats(_frame_value(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6,
                          "ImageOrientationPatient")
    spacing = _floats(_frame_value(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing")
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    if (abs(np.linalg.norm(row_dir) - 1) > _ORIENTATION_TOLERANCE
            or abs(np.linalg.norm(col_dir) - 1) > _ORIENTATION_TOLERANCE
            or abs(float(row_dir @ col_dir)) > _ORIENTATION_TOLERANCE):
        raise _Reject("bad_geometry", f"ImageOrientationPatient {orientation} is not two orthogonal unit vectors")
    if min(spacing) <= 0:
        raise _Reject("bad_geometry", f"PixelSpacing {spacing} must be positive")
    normal = np.cross(row_dir, col_dir)
    thickness = _first(_frame_value(ds, index, "PixelMeasuresSequence", "SliceThickness"))
    return {
        "image_position": position,
        "image_orientation": orientation,
        # Position along the slice normal: the coordinate slices are sorted and spaced by.
        "z_position": float(np.dot(position, normal)),
        "pixel_spacing_row": spacing[0],
        "pixel_spacing_col": spacing[1],
        "slice_thickness": thickness,
    }


def _transfer_syntax(ds: pydicom.Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(value) if value else None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _records(ds: pydicom.Dataset, frames_hu: np.ndarray, pseudonymize, uids) -> list[dict]:
    study_uid = _text(ds, "StudyInstanceUID")
    sop_uid = _text(ds, "SOPInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    if not sop_uid or not series_uid:
        raise _Reject("unreadable_header", "missing SOPInstanceUID or SeriesInstanceUID")
    geometries = [_geometry(ds, i) for i in range(frames_hu.shape[0])]
    patient = pseudonymize(_text(ds, "PatientID"), study_uid or series_uid)
    study_uid, sop_uid, series_uid = uids(study_uid), uids(sop_uid), uids(series_uid)
    instance = ds.get("InstanceNumber")
    sop_class = str(ds.get("SOPClassUID", ""))
    common = {
        "patient_pseudonym": patient,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": sop_uid,
        "sop_class": CT_SOP_CLASSES.get(sop_class, sop_class or None),
        "frame_of_reference_uid": uids(_text(ds, "FrameOfReferenceUID")),
        "transfer_syntax": _transfer_syntax(ds),
        "instance_number": int(instance) if instance not in (None, "") else None,
        "modality": _text(ds, "Modality") or "CT",
        "manufacturer": _text(ds, "Manufacturer"),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "pixel_dtype": "int16",
    }
    records = []
    for index, (frame, geometry) in enumerate(zip(frames_hu, geometries)):
        slope, intercept = _rescale(ds, index)
        records.append({
            **common,
            **geometry,
            "frame": index + 1,
            "rescale_slope": slope,
            "rescale_intercept": intercept,
            "window_center": _first(_frame_value(ds, index, "FrameVOILUTSequence", "WindowCenter")),
            "window_width": _first(_frame_value(ds, index, "FrameVOILUTSequence", "WindowWidth")),
            "pixel_shape": list(frame.shape),
            "pixels": frame.astype("<i2", copy=False).tobytes(order="C"),
        })
    return records


def _rejection(reason: str, message: str, ds: pydicom.Dataset | None, uids) -> Rejection:
    known = {}
    if ds is not None:
        for key, keyword in (("sop_uid", "SOPInstanceUID"), ("series_uid", "SeriesInstanceUID"),
                             ("modality", "Modality")):
            try:
                known[key] = _text(ds, keyword)
            except Exception:
                known[key] = None
        known["sop_uid"], known["series_uid"] = uids(known["sop_uid"]), uids(known["series_uid"])
        known["transfer_syntax"] = _transfer_syntax(ds)
    return Rejection(reason=reason, message=scrub(message, ds, uids)[:500], **known)


def scrub(message: str, ds: pydicom.Dataset | None, uids=_retain) -> str:
    """Remove the values of identifying attributes from an error message.

    pydicom quotes offending values in some errors ("Invalid value 'DOE^JOHN'"),
    and quarantine messages end up in a table.
    """
    if ds is None:
        return message
    for keyword in IDENTIFYING_ATTRIBUTES:
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        for text in {str(value), str(value).replace("^", " ")} if value not in (None, "") else ():
            if len(text) >= 2:
                message = message.replace(text, "[removed]")
    if uids is not _retain:
        # A message may quote a UID the tables hold only replaced.
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            value = _text(ds, keyword) if keyword in ds else None
            if value:
                message = message.replace(value, uids(value))
    return message


def hu_frame(pixels: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Inverse of the record packing: the int16 HU array of a ``slices`` row."""
    return np.frombuffer(pixels, dtype="<i2").reshape(tuple(shape))

"""De-identification: keyed pseudonyms for patients, and the list of what never leaves a file.

ctlake follows DICOM PS3.15 Annex E's Basic Application Level Confidentiality
Profile by *allow-listing*: a table row is built from the technical attributes
named in :data:`KEPT_ATTRIBUTES` only, so names, birth dates, addresses,
institutions, physicians, accession numbers, dates and free text cannot reach
a table by accident.  Patient ID is replaced by an HMAC-SHA256 pseudonym, so
the same patient gets the same pseudonym in every run (joins across tables and
runs work) while nobody without the key can recompute or reverse it.
UIDs are kept (PS3.15 "Retain UIDs Option") or replaced by keyed ``2.25.``
UIDs (:class:`UidReplacer`), as ``privacy.uids`` says; lineage from a patch
back to its slice holds either way.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re

#: Public, fixed, and therefore worthless as a secret: only for the synthetic sample cohort.
DEV_KEY = b"ctlake-development-key-NOT-SECRET"

#: Shortest key accepted from any source: 8-digit MRNs are enumerable, so the key must not be.
MIN_KEY_BYTES = 32

#: The file the cohort generator writes at the top of a synthetic cohort; the development key is
#: accepted for input inside such a folder only.
SYNTHETIC_MARKER = "CTLAKE_SYNTHETIC_COHORT"


def key_fingerprint(key: bytes) -> str:
    """``k-`` + 16 hex digits of HMAC-SHA256(key, a constant): names a key without revealing it.

    Stored next to every pseudonym, so anyone can tell which key made which
    pseudonyms, and a run under another key is refused instead of silently
    splitting every patient in two.
    """
    return "k-" + hmac.new(key, b"ctlake key fingerprint", hashlib.sha256).hexdigest()[:16]


def source_id(key: bytes, path: str) -> str:
    """``f-`` + 24 hex digits of HMAC-SHA256(key, path): names a source file without its path.

    Receivers name folders after patients (``DOE_JANE_19010203_MRN42/``), so a
    path is identifying; the tables keep this instead, and only a restricted
    map outside the warehouse turns it back into a path.
    """
    return "f-" + hmac.new(key, b"source:" + path.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


class UidReplacer:
    """Keyed replacement UIDs (PS3.15 without the Retain UIDs Option): ``2.25.`` + a 128-bit HMAC as an integer.

    Deterministic under one key, so a series stays whole across files and
    runs and lineage holds; without the key a replaced UID cannot be linked
    back to the archive's (whose UIDs can embed device serials and times).
    ``2.25.`` is the root PS3.5 B.2 gives UUID-derived UIDs; at most 44
    characters, within the 64 a UID may have.
    """

    def __init__(self, key: bytes):
        self.key = key

    def __call__(self, uid: str | None) -> str | None:
        if not uid:
            return uid
        digest = hmac.new(self.key, b"uid:" + uid.encode("ascii", "replace"), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))


def in_synthetic_cohort(path: str) -> bool:
    """``path`` (a local file, folder or glob) lies inside a folder the cohort generator marked."""
    folder = os.path.abspath(re.split(r"[*?\[{]", path, maxsplit=1)[0] or ".")
    while True:
        if os.path.isfile(os.path.join(folder, SYNTHETIC_MARKER)):
            return True
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent

#: Attributes copied from a DICOM header into the ``slices`` table (plus pixel data and geometry).
KEPT_ATTRIBUTES = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
    "Modality", "Manufacturer", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
    "Rows", "Columns", "NumberOfFrames", "TransferSyntaxUID",
)

#: PS3.15 Basic Profile attributes whose values must never appear in a table, log or report.
#: Used to scrub error messages and by the tests that search every written table.
IDENTIFYING_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames",
    "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "Occupation", "PatientComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "AccessionNumber", "StudyID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "StationName", "DeviceSerialNumber", "StudyDescription",
    "SeriesDescription", "RequestAttributesSequence", "IssuerOfPatientID", "MedicalRecordLocator",
)


class Pseudonymizer:
    """Keyed, deterministic patient pseudonyms: ``p-`` + 24 hex digits of HMAC-SHA256.

    Parameters
    ----------
    key : bytes
        The secret.  Anyone holding it can test a guessed patient ID, so it
        lives in an environment variable or a secret file, never in ``conf/``.
    """

    def __init__(self, key: bytes):
        self.key = key

    def __call__(self, patient_id: str | None, fallback: str = "") -> str:
        """Pseudonym of ``patient_id``; a file without one is keyed by ``fallback`` (its study UID).

        Keying a missing ID by study keeps unrelated anonymous studies apart
        instead of merging them all into one "empty" patient.
        """
        value = (patient_id or "").strip()
        material = f"id:{value}" if value else f"study:{fallback}"
        return "p-" + hmac.new(self.key, material.encode("utf-8"), hashlib.sha256).hexdigest()[:24]

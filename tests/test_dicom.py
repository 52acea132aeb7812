"""Parsing real and broken DICOM files into slice records or quarantine reasons (no Spark)."""
import re

import numpy as np
import pydicom
import pytest
from dicom_files import build_hostile_folder, build_mixed_folder, real

from ctlake.core.deid import DEV_KEY, Pseudonymizer, UidReplacer
from ctlake.core.dicom_parse import ParsePolicy, Rejection, _rescale_integral, hu_frame, parse_dicom

pseudonymize = Pseudonymizer(DEV_KEY)


def outcome(path):
    result = parse_dicom(path.read_bytes(), pseudonymize)
    return result.reason if isinstance(result, Rejection) else f"slices:{len(result)}"


def test_each_file_gets_its_expected_outcome(tmp_path):
    expected = build_mixed_folder(tmp_path)
    # Duplicates are decided across files by the ingest job; alone, such a file parses fine.
    single = {name: ("slices:1" if want == "duplicate" else want) for name, want in expected.items()}
    assert {name: outcome(tmp_path / name) for name in expected} == single


def test_hu_pixels_equal_pydicom_rescaled_values():
    ds = pydicom.dcmread(real("CT_small.dcm"))
    (record,) = parse_dicom(real("CT_small.dcm").read_bytes(), pseudonymize)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert record["pixel_shape"] == [128, 128]
    np.testing.assert_array_equal(hu_frame(record["pixels"], record["pixel_shape"]), expected.astype(np.int16))


def test_lossless_jpeg2000_decodes_to_the_same_hu_as_uncompressed():
    (j2k,) = parse_dicom(real("693_J2KR.dcm").read_bytes(), pseudonymize)
    (raw,) = parse_dicom(real("693_UNCR.dcm").read_bytes(), pseudonymize)
    assert j2k["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert j2k["pixels"] == raw["pixels"]


def test_enhanced_ct_gives_one_record_per_frame_with_its_own_position():
    records = parse_dicom(real("eCT_Supplemental.dcm").read_bytes(), pseudonymize)
    assert [r["frame"] for r in records] == [1, 2]
    assert records[0]["z_position"] != records[1]["z_position"]
    assert records[0]["sop_class"] == "Enhanced CT Image Storage"
    assert all(r["pixel_spacing_row"] > 0 and r["pixel_shape"] == [512, 512] for r in records)


def test_z_position_is_measured_along_the_slice_normal():
    (record,) = parse_dicom(real("CT_small.dcm").read_bytes(), pseudonymize)
    ds = pydicom.dcmread(real("CT_small.dcm"), stop_before_pixels=True)
    normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
    assert record["z_position"] == pytest.approx(float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))


def test_patient_id_is_replaced_by_a_keyed_pseudonym():
    (record,) = parse_dicom(real("CT_small.dcm").read_bytes(), pseudonymize)
    assert record["patient_pseudonym"] == pseudonymize("1CT1", "")
    assert record["patient_pseudonym"] != Pseudonymizer(b"another-key-of-16+bytes")("1CT1", "")
    assert "1CT1" not in repr({k: v for k, v in record.items() if k != "pixels"})


def test_missing_patient_ids_are_kept_apart_by_study():
    assert pseudonymize(None, "1.2.3") != pseudonymize(None, "1.2.4")
    assert pseudonymize("", "1.2.3") == pseudonymize(None, "1.2.3")


@pytest.mark.parametrize("dtype, intercept", [(np.uint16, -1024.0), (np.int16, -1024.0), (np.int16, 0.0),
                                              (np.uint8, 7.0), (np.uint16, 1000.0)])
def test_integer_rescale_equals_the_float_path(dtype, intercept):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    stored = rng.integers(max(info.min, -30000), min(info.max, 30000), size=(64, 64), endpoint=True).astype(dtype)
    stored.flat[:2] = max(info.min, -30000), min(info.max, 30000)
    by_float = np.clip(np.rint(stored.astype(np.float32) * 1.0 + intercept), -32768, 32767).astype(np.int16)
    out = np.empty(stored.shape, np.int16)
    assert _rescale_integral(stored, 1.0, intercept, out)
    np.testing.assert_array_equal(out, by_float)


@pytest.mark.parametrize("stored, slope, intercept", [
    (np.array([[0, 40000]], np.uint16), 1.0, -1024.0),   # beyond int16 before the shift
    (np.array([[0, 32000]], np.int16), 1.0, 1024.0),     # the sum overflows int16: clipped by the float path
    (np.array([[0, 100]], np.int16), 1.0, -1024.5),      # fractional intercept
    (np.array([[0, 100]], np.int16), 0.5, -1024.0),      # slope other than 1
])
def test_integer_rescale_declines_what_only_the_float_path_gets_right(stored, slope, intercept):
    assert not _rescale_integral(stored, slope, intercept, np.empty(stored.shape, np.int16))


def test_hostile_files_are_refused_from_their_headers(tmp_path):
    expected = build_hostile_folder(tmp_path, zeros_bytes=4 * 2**20)
    assert {name: outcome(tmp_path / name) for name in expected} == expected
    huge = parse_dicom((tmp_path / "rle_65535x65535.dcm").read_bytes(), pseudonymize)
    assert "65535 x 65535 x 1 frames at 16 bits declare 8589672450 bytes" in huge.message


def test_configuration_accepts_what_it_names_and_caps_what_it_sets(tmp_path):
    build_hostile_folder(tmp_path, zeros_bytes=1024)
    content = {name: (tmp_path / name).read_bytes() for name in ("burned_in_annotation.dcm", "screen_save.dcm")}
    lenient = ParsePolicy(accept_burned_in_annotation=True, accept_secondary_images=True)
    assert all(len(parse_dicom(c, pseudonymize, lenient)) == 1 for c in content.values())
    small = ParsePolicy(max_decoded_bytes=128 * 128 * 2 - 1)
    assert parse_dicom(real("CT_small.dcm").read_bytes(), pseudonymize, small).reason == "too_large_decoded"
    assert len(parse_dicom(real("CT_small.dcm").read_bytes(), pseudonymize,
                           ParsePolicy(max_decoded_bytes=128 * 128 * 2))) == 1


def test_replaced_uids_are_keyed_valid_and_stable():
    replace = UidReplacer(DEV_KEY)
    records = parse_dicom(real("eCT_Supplemental.dcm").read_bytes(), pseudonymize, uids=replace)
    ds = pydicom.dcmread(real("eCT_Supplemental.dcm"), stop_before_pixels=True)
    for record in records:
        assert record["series_uid"] == replace(str(ds.SeriesInstanceUID)) != str(ds.SeriesInstanceUID)
        assert record["sop_uid"] == replace(str(ds.SOPInstanceUID))
        assert record["study_uid"] == replace(str(ds.StudyInstanceUID))
        for uid in (record["series_uid"], record["sop_uid"], record["study_uid"], record["frame_of_reference_uid"]):
            assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
    kept = parse_dicom(real("eCT_Supplemental.dcm").read_bytes(), pseudonymize)
    assert [r["pixels"] for r in records] == [r["pixels"] for r in kept]
    assert UidReplacer(b"another key of thirty-two bytes!")(str(ds.SOPInstanceUID)) != records[0]["sop_uid"]
    assert replace(None) is None

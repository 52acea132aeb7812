"""Ingestion on a real local Spark session into real Delta tables."""
import shutil

import numpy as np
import pydicom
import pytest
from ctlake import config as cfg
from ctlake.core import dicom_parse as dicom
from ctlake.core.deid import IDENTIFYING_ATTRIBUTES
from ctlake.errors import InputError
from ctlake.spark import ingest, tables
from delta.tables import DeltaTable
from dicom_files import build_mixed_folder, pydicom_test_folder, real
from pyspark.sql import functions as F


def outcomes(spark, config):
    sliced = tables.read(spark, config, tables.SLICES).groupBy("source_path").count().collect()
    quarantined = tables.read(spark, config, tables.QUARANTINE).select("source_path", "reason").collect()
    result = {r["source_path"].rsplit("/", 1)[-1]: f"slices:{r['count']}" for r in sliced}
    for r in quarantined:
        name = r["source_path"].rsplit("/", 1)[-1]
        assert name not in result, f"{name} is in both slices and quarantine"
        result[name] = r["reason"]
    return result


@pytest.fixture
def mixed(tmp_path):
    folder = tmp_path / "input"
    return folder, build_mixed_folder(folder)


def test_every_file_lands_in_exactly_one_table_with_the_expected_outcome(spark, config, mixed):
    folder, expected = mixed
    summary = ingest.run(spark, config, str(folder))
    assert outcomes(spark, config) == expected
    assert summary["files_seen"] == summary["new_files"] == len(expected)
    assert summary["slices_written"] == 6
    assert summary["files_ingested"] + sum(summary["quarantined"].values()) == len(expected)
    assert summary["quarantined"] == {"bad_geometry": 1, "duplicate": 2, "no_pixel_data": 1, "not_ct": 1,
                                      "not_dicom": 2, "truncated": 1}
    dup = tables.read(spark, config, tables.QUARANTINE).filter(F.col("source_path").endswith("693_UNCR.dcm")).first()
    assert dup["message"].endswith("693_J2KR.dcm")


def test_rerun_writes_nothing_and_new_files_add_exactly_their_rows(spark, config, mixed):
    folder, expected = mixed
    ingest.run(spark, config, str(folder))
    versions = {t: DeltaTable.forPath(spark, cfg.table_path(config, t)).history(1).first()["version"]
                for t in (tables.SLICES, tables.QUARANTINE, tables.SERIES)}

    again = ingest.run(spark, config, str(folder))
    assert (again["new_files"], again["slices_written"], again["quarantined"]) == (0, 0, {})
    assert {t: DeltaTable.forPath(spark, cfg.table_path(config, t)).history(1).first()["version"]
            for t in versions} == versions

    shutil.copy(real("693_UNCI.dcm"), folder / "later.dcm")
    later = ingest.run(spark, config, str(folder))
    assert (later["new_files"], later["files_ingested"], later["slices_written"]) == (1, 1, 1)
    assert outcomes(spark, config) == {**expected, "later.dcm": "slices:1"}


def test_series_table_describes_layout(spark, config, mixed):
    folder, _ = mixed
    ingest.run(spark, config, str(folder))
    series = {r["series_uid"]: r for r in tables.read(spark, config, tables.SERIES).collect()}
    ect = pydicom.dcmread(real("eCT_Supplemental.dcm"), stop_before_pixels=True)
    row = series[str(ect.SeriesInstanceUID)]
    assert row["slice_count"] == 2 and row["consistent_geometry"]
    assert len(series) == tables.read(spark, config, tables.SLICES).select("series_uid").distinct().count()


def test_no_identifying_value_reaches_any_table(spark, config, mixed):
    folder, _ = mixed
    ingest.run(spark, config, str(folder))
    secrets = set()
    for path in folder.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in IDENTIFYING_ATTRIBUTES:
            value = ds.get(keyword) if keyword in ds else None
            if value not in (None, "") and len(str(value)) >= 4 and not str(value).isdigit():
                secrets.add(str(value))
    assert {"CompressedSamples^CT1", "JFK IMAGING CENTER", "Perfusion^MCA Stroke"} <= secrets
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE):
        df = tables.read(spark, config, table)
        text_columns = [f.name for f in df.schema.fields if f.dataType.simpleString() == "string"]
        for row in df.select(*text_columns).collect():
            blob = "|".join(str(v) for v in row)
            assert not [s for s in secrets if s in blob], f"identifying value in {table}"


def test_whole_pydicom_test_folder_is_accounted_for(spark, config):
    folder = pydicom_test_folder()
    summary = ingest.run(spark, config, str(folder))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert summary["files_seen"] == len(files)
    assert summary["accounted_for"]
    assert summary["files_ingested"] + sum(summary["quarantined"].values()) == len(files)


def test_missing_input_is_a_clear_error(spark, config, tmp_path):
    with pytest.raises(InputError, match="input path not found"):
        ingest.run(spark, config, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("dtype, intercept", [(np.uint16, -1024.0), (np.int16, -1024.0), (np.int16, 0.0),
                                              (np.uint8, 7.0), (np.uint16, 1000.0)])
def test_integer_rescale_equals_the_float_path(dtype, intercept):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    stored = rng.integers(max(info.min, -30000), min(info.max, 30000), size=(64, 64), endpoint=True).astype(dtype)
    stored.flat[:2] = max(info.min, -30000), min(info.max, 30000)
    by_float = np.clip(np.rint(stored.astype(np.float32) * 1.0 + intercept), -32768, 32767).astype(np.int16)
    out = np.empty(stored.shape, np.int16)
    assert dicom._rescale_integral(stored, 1.0, intercept, out)
    np.testing.assert_array_equal(out, by_float)


@pytest.mark.parametrize("stored, slope, intercept", [
    (np.array([[0, 40000]], np.uint16), 1.0, -1024.0),   # beyond int16 before the shift
    (np.array([[0, 32000]], np.int16), 1.0, 1024.0),     # the sum overflows int16: clipped by the float path
    (np.array([[0, 100]], np.int16), 1.0, -1024.5),      # fractional intercept
    (np.array([[0, 100]], np.int16), 0.5, -1024.0),      # slope other than 1
])
def test_integer_rescale_declines_what_only_the_float_path_gets_right(stored, slope, intercept):
    assert not dicom._rescale_integral(stored, slope, intercept, np.empty(stored.shape, np.int16))


def test_local_listing_sees_every_file_in_binaryfile_path_form(spark, tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.dcm", ".hidden.dcm", "_underscore.dcm", "sub/b.dcm"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty.dcm").write_bytes(b"")
    expected = sorted(f"file:{tmp_path}/{n}" for n in ("a.dcm", ".hidden.dcm", "_underscore.dcm", "sub/b.dcm",
                                                       "empty.dcm"))
    assert [f.path for f in ingest.list_files(spark, str(tmp_path))] == expected
    assert [f.path for f in ingest.list_files(spark, f"file://{tmp_path}")] == expected
    assert [f.path for f in ingest.list_files(spark, f"{tmp_path}/{{a,sub}}*")] == [expected[2], expected[4]]
    seen = spark.read.format("binaryFile").load(str(tmp_path / "a.dcm")).select("path").first()["path"]
    assert seen == expected[2]
    assert {f.length for f in ingest.list_files(spark, str(tmp_path))} == {0, 1}

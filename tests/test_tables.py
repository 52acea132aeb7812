"""The storage layer: one key for a candidate, paths in one place, scoped session settings."""
import pytest

from ctlake.errors import InputError
from ctlake.spark import ingest, tables
from ctlake.spark.session import session_conf


def test_an_annotation_and_its_nodule_get_the_same_id(spark, tmp_path):
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                              "1.2.3,-12.5,40.125,-100.0,6.0\n1.2.3,1.0,2.0,3.0,4.0\n")
    (tmp_path / "nodules.csv").write_text("seriesuid,nodule_id,coordX,coordY,coordZ,diameter_mm,label,texture\n"
                                          "1.2.3,n1,-12.500,40.125,-100.000,6.000,malignant,5\n")
    keyed = tables.read_annotations(spark, str(tmp_path / "annotations.csv")).withColumnRenamed(
        "nodule_key", "candidate_id")
    nodules = tables.read_nodules(spark, str(tmp_path / "nodules.csv"))
    joined = keyed.join(nodules, "candidate_id").select("diameter_mm", "nodule_label", "nodule_texture").collect()
    assert [(r["diameter_mm"], r["nodule_label"], r["nodule_texture"]) for r in joined] == [(6.0, "malignant", 5.0)]
    assert keyed.select("candidate_id").distinct().count() == 2


def test_missing_input_files_are_named(spark, tmp_path):
    with pytest.raises(InputError, match="annotations file not found: .*absent.csv"):
        tables.read_annotations(spark, str(tmp_path / "absent.csv"))


def test_paths_live_under_the_warehouse():
    assert tables.table_path("s3a://b/wh/", tables.SLICES) == "s3a://b/wh/slices"
    assert tables.models_path("/wh", "r1") == "/wh/models/r1"


def test_a_stage_session_setting_is_restored_afterwards(spark):
    key = "spark.sql.execution.arrow.maxBytesPerBatch"
    before = spark.conf.get(key)
    with session_conf(spark, {key: 12345, "spark.sql.files.maxPartitionBytes": 1 << 20}):
        assert spark.conf.get(key) == "12345"
    assert spark.conf.get(key) == before


def test_every_table_exists_after_an_ingest_of_an_empty_folder(spark, config, tmp_path):
    (tmp_path / "empty").mkdir()
    summary = ingest.run(spark, config, str(tmp_path / "empty"))
    assert summary["warning"] == f"no files under {tmp_path / 'empty'}"
    assert summary["table_totals"] == {tables.SLICES: 0, tables.SERIES: 0, tables.QUARANTINE: 0}
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE):
        assert tables.exists(spark, config.warehouse, table)
        assert tables.read(spark, config.warehouse, table).schema == tables.SCHEMAS[table]


def test_a_lookup_reads_the_rows_a_spark_filter_finds(spark, cohort_config):
    from pyspark.sql import functions as F

    warehouse = cohort_config.warehouse
    slices = tables.read(spark, warehouse, tables.SLICES)
    wanted = sorted(r["sop_uid"] for r in slices.select("sop_uid").orderBy("sop_uid").limit(3).collect())[::2]
    found = tables.lookup(spark, warehouse, tables.SLICES, {"sop_uid": wanted, "frame": [1]},
                          ["sop_uid", "pixels", "pixel_shape"])
    expected = slices.filter(F.col("sop_uid").isin(wanted)).select("sop_uid", "pixels", "pixel_shape").collect()
    assert sorted(found.to_pylist(), key=lambda r: r["sop_uid"]) == sorted(
        (r.asDict() for r in expected), key=lambda r: r["sop_uid"])
    assert len(expected) == 2
    assert tables.lookup(spark, warehouse, tables.SLICES, {"sop_uid": ["1.2.none"]}, ["pixels"]).num_rows == 0

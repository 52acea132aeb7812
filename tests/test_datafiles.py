"""Data files written outside Spark and committed to Delta by the driver: what Spark then reads."""
import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from ctlake.spark import datafiles, tables


def quarantine_rows(*ids):
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    return pa.Table.from_pylist(
        [{"source_id": i, "source_size": 10 * n, "reason": "not_dicom", "message": None, "sop_uid": None,
          "series_uid": None, "modality": "CT" if n % 2 else None, "transfer_syntax": None, "quarantined_at": now,
          "ingest_run": "r1", "key_fingerprint": "k-1"} for n, i in enumerate(ids, 1)],
        schema=tables.arrow_schema(tables.QUARANTINE))


def test_written_files_carry_exact_statistics(tmp_path):
    writer = datafiles.FileWriter(str(tmp_path), tables.arrow_schema(tables.QUARANTINE), "snappy")
    writer.write(quarantine_rows("f-b", "f-a"))
    writer.write(quarantine_rows("f-c"))
    (written,) = writer.close()
    stats = json.loads(written.stats)
    assert (written.rows, stats["numRecords"]) == (3, 3)
    assert (stats["minValues"]["source_id"], stats["maxValues"]["source_id"]) == ("f-a", "f-c")
    assert (stats["minValues"]["source_size"], stats["maxValues"]["source_size"]) == (10, 20)
    assert stats["nullCount"]["modality"] == 1 and stats["nullCount"]["message"] == 3
    assert "message" not in stats["minValues"]  # all null: no range
    assert written.size == (tmp_path / written.name).stat().st_size


def test_a_reader_that_skips_files_by_their_statistics_finds_every_row(spark, tmp_path):
    """Timestamp statistics included, to the millisecond with the maximum rounded up."""
    from deltalake import DeltaTable

    warehouse = str(tmp_path)
    rows = quarantine_rows("f-a", "f-b")
    late = datetime(2026, 12, 3, 12, 0, 0, 999_600, tzinfo=UTC)
    rows = rows.set_column(rows.schema.get_field_index("quarantined_at"), "quarantined_at",
                           pa.array([late, late], tables.arrow_schema(tables.QUARANTINE).field("quarantined_at").type))
    datafiles.append_new(spark, warehouse, tables.QUARANTINE, rows, "source_id", {"run": "r1"})
    dataset = DeltaTable(tables.local_folder(spark, warehouse, tables.QUARANTINE)).to_pyarrow_dataset()
    for condition in (pc.field("quarantined_at") >= pa.scalar(late), pc.field("quarantined_at") <= pa.scalar(late),
                      pc.field("source_size") == 20, pc.field("source_id") == "f-a"):
        assert dataset.to_table(filter=condition).num_rows >= 1, condition
    assert tables.read(spark, warehouse, tables.QUARANTINE).filter(F.col("quarantined_at") == late).count() == 2


def test_committed_files_read_back_in_spark_and_a_stale_commit_is_refused(spark, tmp_path):
    warehouse = str(tmp_path)
    version = datafiles.ensure_table(spark, warehouse, tables.QUARANTINE)
    assert datafiles.append_new(spark, warehouse, tables.QUARANTINE, quarantine_rows("f-a", "f-b"), "source_id",
                                {"run": "r1"}) == 2
    # The same keys again add nothing; a new one is added alone.
    assert datafiles.append_new(spark, warehouse, tables.QUARANTINE, quarantine_rows("f-a", "f-b", "f-c"),
                                "source_id", {"run": "r2"}) == 1
    expected = spark.createDataFrame(quarantine_rows("f-a", "f-b").to_pylist() + [
        {**quarantine_rows("f-a", "f-b", "f-c").to_pylist()[2]}], tables.QUARANTINE_SCHEMA)
    assertDataFrameEqual(tables.read(spark, warehouse, tables.QUARANTINE), expected)
    assert tables.read(spark, warehouse, tables.QUARANTINE).count() == 3

    writer = datafiles.FileWriter(tables.local_folder(spark, warehouse, tables.QUARANTINE),
                                  tables.arrow_schema(tables.QUARANTINE), "snappy")
    writer.write(quarantine_rows("f-d"))
    with pytest.raises(datafiles.ConcurrentCommit):
        datafiles.commit(spark, warehouse, tables.QUARANTINE, writer.close(), version, {"run": "stale"})
    assert tables.read(spark, warehouse, tables.QUARANTINE).count() == 3


def test_a_rewritten_file_loses_exactly_the_named_rows(spark, tmp_path):
    warehouse = str(tmp_path)
    datafiles.ensure_table(spark, warehouse, tables.QUARANTINE)
    writer = datafiles.FileWriter(tables.local_folder(spark, warehouse, tables.QUARANTINE),
                                  tables.arrow_schema(tables.QUARANTINE), "snappy")
    writer.write(quarantine_rows("f-a", "f-b", "f-c"))
    (written,) = writer.close()
    rewritten = datafiles.rewrite_without(spark, warehouse, tables.QUARANTINE, written.name, ["source_id"], {"f-b"},
                                          "snappy")
    assert (tmp_path / tables.QUARANTINE / written.name).exists()  # the caller's to discard or remove
    assert rewritten.rows == 2 and json.loads(rewritten.stats)["maxValues"]["source_id"] == "f-c"
    datafiles.commit(spark, warehouse, tables.QUARANTINE, [rewritten], tables.version(spark, warehouse,
                                                                                         tables.QUARANTINE), {})
    assert sorted(r[0] for r in tables.read(spark, warehouse, tables.QUARANTINE).select("source_id").collect()) == [
        "f-a", "f-c"]


def test_direct_writes_need_a_mounted_warehouse(spark):
    from ctlake.errors import ConfigError

    assert datafiles.direct(spark, "auto", "/data/warehouse") and datafiles.direct(spark, "auto", "file:///w")
    assert not datafiles.direct(spark, "auto", "s3a://bucket/w") and not datafiles.direct(spark, "spark", "/w")
    with pytest.raises(ConfigError, match="table_writer direct needs a warehouse on a mounted filesystem"):
        datafiles.direct(spark, "direct", "hdfs:///w")

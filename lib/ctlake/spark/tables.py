"""Schemas of ctlake's Delta tables, declared once, and the one layer that reads and writes them."""
from __future__ import annotations

from ctlake import config as cfg
from ctlake.errors import InputError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

SLICES = "slices"
SERIES = "series"
QUARANTINE = "quarantine"
PREPROCESSED = "preprocessed"
PATCHES = "patches"

#: Columns of one image frame that come from parsing (pure ``ctlake.dicom`` output).
FRAME_FIELDS = [
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("study_uid", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("frame", T.IntegerType()),
    T.StructField("sop_class", T.StringType()),
    T.StructField("frame_of_reference_uid", T.StringType()),
    T.StructField("transfer_syntax", T.StringType()),
    T.StructField("instance_number", T.IntegerType()),
    T.StructField("modality", T.StringType()),
    T.StructField("manufacturer", T.StringType()),
    T.StructField("rows", T.IntegerType()),
    T.StructField("columns", T.IntegerType()),
    T.StructField("image_position", T.ArrayType(T.DoubleType())),
    T.StructField("image_orientation", T.ArrayType(T.DoubleType())),
    T.StructField("z_position", T.DoubleType()),
    T.StructField("pixel_spacing_row", T.DoubleType()),
    T.StructField("pixel_spacing_col", T.DoubleType()),
    T.StructField("slice_thickness", T.DoubleType()),
    T.StructField("rescale_slope", T.DoubleType()),
    T.StructField("rescale_intercept", T.DoubleType()),
    T.StructField("window_center", T.DoubleType()),
    T.StructField("window_width", T.DoubleType()),
    T.StructField("pixel_shape", T.ArrayType(T.IntegerType())),
    T.StructField("pixel_dtype", T.StringType()),
    T.StructField("pixels", T.BinaryType()),
]

SOURCE_FIELDS = [
    T.StructField("source_path", T.StringType()),
    T.StructField("source_size", T.LongType()),
    T.StructField("source_mtime", T.TimestampType()),
]

#: ``slices``: one row per image frame, pixels in HU as little-endian int16 bytes.
SLICES_SCHEMA = T.StructType(FRAME_FIELDS + SOURCE_FIELDS + [
    T.StructField("ingested_at", T.TimestampType()),
    T.StructField("ingest_run", T.StringType()),
])

#: What the parsing UDF emits: a frame row (``reason`` null) or one rejected file.
PARSED_SCHEMA = T.StructType(FRAME_FIELDS + SOURCE_FIELDS + [
    T.StructField("reason", T.StringType()),
    T.StructField("message", T.StringType()),
])

#: ``quarantine``: one row per input file that is not a usable CT image.
QUARANTINE_SCHEMA = T.StructType(SOURCE_FIELDS + [
    T.StructField("reason", T.StringType()),
    T.StructField("message", T.StringType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("modality", T.StringType()),
    T.StructField("transfer_syntax", T.StringType()),
    T.StructField("quarantined_at", T.TimestampType()),
    T.StructField("ingest_run", T.StringType()),
])

#: ``series``: one row per series, recomputed whenever it gains slices.
SERIES_SCHEMA = T.StructType([
    T.StructField("series_uid", T.StringType()),
    T.StructField("study_uid", T.StringType()),
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("modality", T.StringType()),
    T.StructField("manufacturer", T.StringType()),
    T.StructField("slice_count", T.IntegerType()),
    T.StructField("z_min", T.DoubleType()),
    T.StructField("z_max", T.DoubleType()),
    T.StructField("spacing_mm", T.DoubleType()),
    T.StructField("spacing_uniform", T.BooleanType()),
    T.StructField("duplicate_positions", T.IntegerType()),
    T.StructField("gaps", T.IntegerType()),
    T.StructField("complete", T.BooleanType()),
    T.StructField("consistent_geometry", T.BooleanType()),
    T.StructField("rows", T.IntegerType()),
    T.StructField("columns", T.IntegerType()),
    T.StructField("pixel_spacing_row", T.DoubleType()),
    T.StructField("pixel_spacing_col", T.DoubleType()),
    T.StructField("slice_thickness", T.DoubleType()),
    T.StructField("updated_at", T.TimestampType()),
])

#: Lineage every derived image row carries back to its patient, series and slice.
LINEAGE_FIELDS = [
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("study_uid", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("frame", T.IntegerType()),
]

#: What the preprocessing UDF returns for one slice.
PREPROCESS_RESULT = T.StructType([
    T.StructField("image", T.BinaryType()),
    T.StructField("mask", T.BinaryType()),
    T.StructField("threshold", T.BinaryType()),
    T.StructField("lung_fraction", T.DoubleType()),
    T.StructField("lung_mean_hu", T.DoubleType()),
    T.StructField("mask_valid", T.BooleanType()),
    T.StructField("error", T.StringType()),
])

#: ``preprocessed``: one row per slice, keyed like ``slices``; images uint8, mask 0/1 uint8.
PREPROCESSED_SCHEMA = T.StructType(LINEAGE_FIELDS + [
    T.StructField("z_position", T.DoubleType()),
    T.StructField("image_shape", T.ArrayType(T.IntegerType())),
] + PREPROCESS_RESULT.fields + [
    T.StructField("chain_hash", T.StringType()),
    T.StructField("processed_at", T.TimestampType()),
])

SCHEMAS = {SLICES: SLICES_SCHEMA, SERIES: SERIES_SCHEMA, QUARANTINE: QUARANTINE_SCHEMA,
           PREPROCESSED: PREPROCESSED_SCHEMA}


def exists(spark: SparkSession, config: dict, table: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, cfg.table_path(config, table))


def read(spark: SparkSession, config: dict, table: str) -> DataFrame:
    """The table as a DataFrame; an empty one with the declared schema when it does not exist yet."""
    if not exists(spark, config, table):
        return spark.createDataFrame([], SCHEMAS[table])
    return spark.read.format("delta").load(cfg.table_path(config, table))


def merge_insert(spark: SparkSession, config: dict, table: str, rows: DataFrame, keys: list[str]) -> None:
    """Insert ``rows`` whose ``keys`` are not in ``table`` yet (creating it on first use).

    A MERGE keyed on the natural key makes a retried or repeated run a no-op
    instead of a source of duplicates.  A column the declared schema gained
    since the table was created is added (older rows read it as null).
    """
    from delta.tables import DeltaTable

    path = cfg.table_path(config, table)
    rows = rows.select(*SCHEMAS[table].fieldNames())
    if not exists(spark, config, table):
        rows.write.format("delta").mode("errorifexists").save(path)
        return
    condition = " AND ".join(f"t.{k} <=> n.{k}" for k in keys)
    (DeltaTable.forPath(spark, path).alias("t").merge(rows.alias("n"), condition)
     .whenNotMatchedInsertAll().withSchemaEvolution().execute())


def merge_upsert(spark: SparkSession, config: dict, table: str, rows: DataFrame, keys: list[str]) -> None:
    """Insert new keys and replace the rows of existing ones (derived tables such as ``series``); evolves like
    :func:`merge_insert`."""
    from delta.tables import DeltaTable

    path = cfg.table_path(config, table)
    rows = rows.select(*SCHEMAS[table].fieldNames())
    if not exists(spark, config, table):
        rows.write.format("delta").mode("errorifexists").save(path)
        return
    condition = " AND ".join(f"t.{k} <=> n.{k}" for k in keys)
    (DeltaTable.forPath(spark, path).alias("t").merge(rows.alias("n"), condition)
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().withSchemaEvolution().execute())


def replace(spark: SparkSession, config: dict, table: str, rows: DataFrame) -> None:
    """Overwrite ``table`` with ``rows`` and their declared schema, column metadata included.

    For a derived table whose layout changed; the previous version stays
    readable by Delta time travel.
    """
    (rows.select(*SCHEMAS[table].fieldNames()).write.format("delta").mode("overwrite")
     .option("overwriteSchema", "true").save(cfg.table_path(config, table)))


def version(spark: SparkSession, config: dict, table: str) -> int | None:
    """The table's latest Delta version (what a run records to time-travel back to its inputs)."""
    from delta.tables import DeltaTable

    if not exists(spark, config, table):
        return None
    return int(DeltaTable.forPath(spark, cfg.table_path(config, table)).history(1).first()["version"])


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file on any Hadoop filesystem (models live beside the tables)."""
    jvm = spark._jvm
    target = jvm.org.apache.hadoop.fs.Path(path)
    fs = target.getFileSystem(spark._jsc.hadoopConfiguration())
    # No .crc side file: run.json is small, and people do open and edit it.
    fs.setWriteChecksum(False)
    stream = fs.create(target, True)
    stream.write(bytearray(text.encode("utf-8")))
    stream.close()


def read_text(spark: SparkSession, path: str) -> str:
    """Read a small text file written by :func:`write_text`; InputError when it is missing."""
    jvm = spark._jvm
    target = jvm.org.apache.hadoop.fs.Path(path)
    fs = target.getFileSystem(spark._jsc.hadoopConfiguration())
    fs.setVerifyChecksum(False)
    if not fs.exists(target):
        raise InputError(f"not found: {path}")
    stream = fs.open(target)
    data = jvm.org.apache.commons.io.IOUtils.toByteArray(stream)
    stream.close()
    return bytes(data).decode("utf-8")

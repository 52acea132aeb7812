"""The storage and contract layer: every table, schema, path and input file ctlake reads or writes.

Table names and schemas are declared here once; transforms take and return
DataFrames, and only this module turns a name into a path (tables under the
warehouse, a run's models, the report's pictures) or reads an input CSV.
Functions take the warehouse root (any Hadoop URI) rather than the
configuration, so nothing here can read a setting it was not given.
"""
from __future__ import annotations

import os
import re
import uuid
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema, to_arrow_type

from ctlake.core.radiomics import FEATURE_NAMES, pixel_names
from ctlake.errors import InputError

SLICES = "slices"
SERIES = "series"
QUARANTINE = "quarantine"
PREPROCESSED = "preprocessed"
CANDIDATES = "candidates"
DETECTIONS = "detections"
PATCHES = "patches"
FEATURES = "features"
RUNS = "runs"
INGEST_RUNS = "ingest_runs"
SOURCE_MAP = "source_map"
INGEST_QUEUE = "ingest_queue"
PREDICTIONS = "predictions"

#: Columns of one image frame that come from parsing (pure ``ctlake.core.dicom_parse`` output).
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

#: A file is named by ``ctlake.core.deid.source_id`` (a keyed hash of its path), never by the path.
SOURCE_FIELDS = [
    T.StructField("source_id", T.StringType()),
    T.StructField("source_size", T.LongType()),
]

#: ``source_map`` (in ``privacy.restricted_warehouse``, never the warehouse): source_id -> path.
SOURCE_MAP_SCHEMA = T.StructType([
    T.StructField("source_id", T.StringType()),
    T.StructField("source_path", T.StringType()),
    T.StructField("ingest_run", T.StringType()),
    T.StructField("listed_at", T.TimestampType()),
])

#: ``ingest_queue`` (restricted, like ``source_map``): files a streaming run queued, in ``entry`` order;
#: each commit holds one micro-batch's worth (``ctlake.spark.ingest_stream``).
INGEST_QUEUE_SCHEMA = T.StructType([
    T.StructField("entry", T.LongType()),
    T.StructField("source_id", T.StringType()),
    T.StructField("source_path", T.StringType()),
    T.StructField("source_size", T.LongType()),
    T.StructField("queued_by", T.StringType()),
    T.StructField("queued_at", T.TimestampType()),
])

#: ``slices``: one row per image frame, pixels in HU as little-endian int16 bytes.
SLICES_SCHEMA = T.StructType(FRAME_FIELDS + SOURCE_FIELDS + [
    T.StructField("ingested_at", T.TimestampType()),
    T.StructField("ingest_run", T.StringType()),
    # ctlake.core.deid.key_fingerprint of the key that made patient_pseudonym.
    T.StructField("key_fingerprint", T.StringType()),
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
    T.StructField("key_fingerprint", T.StringType()),
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

#: ``patches``: one row per patch with full lineage; pixels are HU int16, shape (channels, px, px).
#: ``candidates``: one row per nodule candidate the detector found; the slice is the nearest to its centre.
CANDIDATES_SCHEMA = T.StructType([T.StructField("candidate_id", T.StringType())] + LINEAGE_FIELDS + [
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("rank", T.IntegerType()),
    T.StructField("coord_x", T.DoubleType()),
    T.StructField("coord_y", T.DoubleType()),
    T.StructField("coord_z", T.DoubleType()),
    T.StructField("plane", T.DoubleType()),
    T.StructField("row", T.DoubleType()),
    T.StructField("col", T.DoubleType()),
    T.StructField("diameter_mm", T.DoubleType()),
    T.StructField("score", T.DoubleType()),
    T.StructField("response_hu", T.DoubleType()),
    T.StructField("roundness", T.DoubleType()),
    T.StructField("peak_hu", T.DoubleType()),
    T.StructField("detector_hash", T.StringType()),
    T.StructField("detected_at", T.TimestampType()),
])

#: ``detections``: one row per series and detector parameters: how many candidates, how long, or why none.
DETECTIONS_SCHEMA = T.StructType([
    T.StructField("series_uid", T.StringType()),
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("n_candidates", T.IntegerType()),
    T.StructField("seconds", T.DoubleType()),
    T.StructField("error", T.StringType()),
    T.StructField("detector_hash", T.StringType()),
    T.StructField("detected_at", T.TimestampType()),
])

PATCHES_SCHEMA = T.StructType([T.StructField("patch_id", T.StringType())] + LINEAGE_FIELDS + [
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("mode", T.StringType()),
    T.StructField("candidate_id", T.StringType()),
    T.StructField("label", T.IntegerType()),
    T.StructField("center_row", T.DoubleType()),
    T.StructField("center_col", T.DoubleType()),
    T.StructField("coord_x", T.DoubleType()),
    T.StructField("coord_y", T.DoubleType()),
    T.StructField("coord_z", T.DoubleType()),
    T.StructField("size_mm", T.DoubleType()),
    # mm between channels for volume patches; null for 2D/2.5D (the series' slice spacing).
    T.StructField("channel_spacing_mm", T.DoubleType()),
    T.StructField("pixels", T.BinaryType()),
    T.StructField("patch_shape", T.ArrayType(T.IntegerType())),
    T.StructField("pixel_dtype", T.StringType()),
    T.StructField("params_hash", T.StringType()),
    T.StructField("created_at", T.TimestampType()),
])

#: ``features``: the ``patches`` lineage (no pixels) and the two feature vectors; the names of their
#: elements travel in the columns' metadata (:func:`features_schema`), the layout hash in a column.
FEATURES_SCHEMA = T.StructType(
    [f for f in PATCHES_SCHEMA.fields if f.name not in ("pixels", "patch_shape", "pixel_dtype", "created_at")] + [
        T.StructField("radiomics", T.ArrayType(T.DoubleType())),
        T.StructField("pixel_vector", T.ArrayType(T.FloatType())),
        T.StructField("layout_hash", T.StringType()),
        T.StructField("error", T.StringType()),
        T.StructField("computed_at", T.TimestampType()),
    ])

#: ``runs``: one row per training run, with the Delta versions of its inputs for time travel.
RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("started_at", T.TimestampType()),
    T.StructField("git_commit", T.StringType()),
    T.StructField("config", T.StringType()),
    T.StructField("input_versions", T.MapType(T.StringType(), T.LongType())),
    T.StructField("split_sizes", T.StringType()),
    T.StructField("metrics", T.StringType()),
    T.StructField("models_path", T.StringType()),
    T.StructField("seconds", T.DoubleType()),
    # The key fingerprints of the pseudonyms the run trained on (ctlake.core.deid.key_fingerprint).
    T.StructField("key_fingerprints", T.ArrayType(T.StringType())),
])

#: ``ingest_runs``: one row per ingestion run, written when it starts (``running``) and replaced when it ends,
#: so a run killed on the way stays visible as ``running`` with no ``ended_at``.
INGEST_RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("mode", T.StringType()),
    T.StructField("status", T.StringType()),
    T.StructField("started_at", T.TimestampType()),
    T.StructField("ended_at", T.TimestampType()),
    # The input as a keyed hash, like source ids: receivers' folders can name patients.
    T.StructField("input_id", T.StringType()),
    T.StructField("files_seen", T.LongType()),
    T.StructField("already_ingested", T.LongType()),
    T.StructField("new_files", T.LongType()),
    T.StructField("files_ingested", T.LongType()),
    T.StructField("ingested_elsewhere", T.LongType()),
    T.StructField("unaccounted", T.LongType()),
    T.StructField("slices_written", T.LongType()),
    T.StructField("series_updated", T.LongType()),
    T.StructField("quarantined", T.MapType(T.StringType(), T.LongType())),
    T.StructField("walk_skipped", T.MapType(T.StringType(), T.LongType())),
    T.StructField("error", T.StringType()),
    # The Delta versions of each table this run committed (slices, quarantine, series).
    T.StructField("versions_written", T.MapType(T.StringType(), T.ArrayType(T.LongType()))),
    T.StructField("key_fingerprint", T.StringType()),
])

#: ``predictions``: one row per scored series and run, with the patches that drove the score.
EVIDENCE = T.StructType([
    T.StructField("patch_id", T.StringType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("center_row", T.DoubleType()),
    T.StructField("center_col", T.DoubleType()),
    T.StructField("p", T.DoubleType()),
])
PREDICTIONS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("patches_scored", T.IntegerType()),
    T.StructField("p_random_forest", T.DoubleType()),
    T.StructField("p_svm_ensemble", T.DoubleType()),
    T.StructField("p_cnn", T.DoubleType()),
    T.StructField("p_ensemble", T.DoubleType()),
    T.StructField("threshold", T.DoubleType()),
    T.StructField("cancer_predicted", T.BooleanType()),
    T.StructField("evidence", T.ArrayType(EVIDENCE)),
    T.StructField("scored_at", T.TimestampType()),
])

SCHEMAS = {SLICES: SLICES_SCHEMA, SERIES: SERIES_SCHEMA, QUARANTINE: QUARANTINE_SCHEMA,
           PREPROCESSED: PREPROCESSED_SCHEMA, CANDIDATES: CANDIDATES_SCHEMA, DETECTIONS: DETECTIONS_SCHEMA,
           PATCHES: PATCHES_SCHEMA, FEATURES: FEATURES_SCHEMA,
           RUNS: RUNS_SCHEMA, INGEST_RUNS: INGEST_RUNS_SCHEMA, PREDICTIONS: PREDICTIONS_SCHEMA,
           SOURCE_MAP: SOURCE_MAP_SCHEMA, INGEST_QUEUE: INGEST_QUEUE_SCHEMA}

#: The names of the feature vectors' elements live in this metadata key of their columns.
FEATURE_NAMES_KEY = "ctlake.feature_names"


def features_schema(pixel_size: int) -> T.StructType:
    """``FEATURES_SCHEMA`` with the element names of both vectors in the columns' metadata."""
    names = {"radiomics": list(FEATURE_NAMES), "pixel_vector": list(pixel_names(pixel_size))}
    return T.StructType([T.StructField(f.name, f.dataType, f.nullable,
                                       {FEATURE_NAMES_KEY: names[f.name]} if f.name in names else f.metadata)
                         for f in FEATURES_SCHEMA.fields])


def feature_names(df: DataFrame, column: str) -> list[str]:
    """The names recorded in a features column's metadata."""
    return list(df.schema[column].metadata.get(FEATURE_NAMES_KEY, []))


# --------------------------------------------------------------------------- paths

def table_path(warehouse: str, table: str) -> str:
    """Where a Delta table lives: ``<warehouse>/<table>``, on any Hadoop filesystem."""
    return f"{warehouse.rstrip('/')}/{table}"


def models_path(warehouse: str, run_id: str) -> str:
    """Where a training run keeps its fitted models and ``run.json``: ``<warehouse>/models/<run_id>``."""
    return f"{warehouse.rstrip('/')}/models/{run_id}"


#: The pictures the jobs write into the report folder, by what they show.
MONTAGE_PNG = "preprocess_montage.png"
REPORT_HTML = "index.html"


def patch_grid_png(mode: str) -> str:
    return f"patch_grid_{mode}.png"


def report_file(folder: str, name: str) -> Path:
    """A file in the (local) report folder, which is created on first use."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path / name


# --------------------------------------------------------------------------- Delta tables

SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


def local_path(spark: SparkSession, uri: str) -> str | None:
    """The local filesystem path ``uri`` names (no scheme on a local default filesystem, or ``file:``), else None."""
    match = SCHEME.match(uri)
    if match is None:
        default_fs = spark._jsc.hadoopConfiguration().get("fs.defaultFS", "file:///")
        return uri if default_fs.lower().startswith("file:") else None
    if match.group(1).lower() != "file":
        return None
    rest = uri[match.end():]
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            return None
        rest = "/" + path
    return rest


def local_folder(spark: SparkSession, warehouse: str, table: str) -> str | None:
    """The local folder of ``table`` when the warehouse is on a locally mounted filesystem, else None."""
    local = local_path(spark, table_path(warehouse, table))
    return os.path.abspath(local) if local is not None else None


def exists(spark: SparkSession, warehouse: str, table: str) -> bool:
    """Whether ``table`` is a Delta table (read from its log with delta-rs where the warehouse is mounted)."""
    folder = local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(folder)
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, table_path(warehouse, table))


def arrow_schema(table: str, columns: list[str] | None = None) -> pa.Schema:
    """``table``'s declared schema (or ``columns`` of it) in Arrow, timestamps in UTC microseconds."""
    fields = SCHEMAS[table].fields if columns is None else [SCHEMAS[table][c] for c in columns]
    return to_arrow_schema(T.StructType(fields), timezone="UTC")


def scan(spark: SparkSession, warehouse: str, table: str, columns: list[str], where: dict | None = None,
         version: int | None = None, distinct: bool = False) -> pa.Table:
    """Small columns of ``table``'s rows on the driver: keys, metadata, never pixels.

    ``where`` keeps the rows whose column is in the given values (every
    condition must hold); ``distinct`` drops repeated rows.  Why not a Spark
    job: a run's checks (keys already ingested, the key fingerprint, which
    series changed) each read a few key columns, and each Spark job costs 0.3-7 s
    of planning, Delta log replay and code generation, most of a one-file run.
    Where the warehouse is mounted they are read with delta-rs and pyarrow
    (files skipped by their statistics, only the named columns read);
    elsewhere by Spark, with the values broadcast.
    """
    where = where or {}
    schema = arrow_schema(table, columns)
    if not exists(spark, warehouse, table):
        return schema.empty_table()
    folder = local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        rows = DeltaTable(folder, version=version).to_pyarrow_dataset().to_table(columns=columns,
                                                                                 filter=_condition(table, where))
        if distinct:
            rows = rows.group_by(columns, use_threads=False).aggregate([]).select(columns)
        return rows.cast(schema)
    frame = read(spark, warehouse, table, version)
    for column, values in where.items():
        wanted = spark.createDataFrame([(v,) for v in values], T.StructType([SCHEMAS[table][column]]))
        frame = frame.join(F.broadcast(wanted), column, "left_semi")
    frame = frame.select(*columns)
    return (frame.distinct() if distinct else frame).toArrow().cast(schema)


def _condition(table: str, where: dict) -> pc.Expression | None:
    """A pyarrow filter: every ``where`` column in its values (None for no condition)."""
    condition = None
    for column, values in where.items():
        term = pc.field(column).isin(pa.array(list(values), to_arrow_type(SCHEMAS[table][column].dataType)))
        condition = term if condition is None else condition & term
    return condition


def row_count(spark: SparkSession, warehouse: str, table: str) -> int:
    """Rows of ``table`` (0 if missing): from the files' row counts in the Delta log where it is mounted."""
    if not exists(spark, warehouse, table):
        return 0
    folder = local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        delta = DeltaTable(folder)
        records = pa.table(delta.get_add_actions(flatten=True)).column("num_records")
        if records.null_count == 0 and _whole_files(delta):
            return int(pc.sum(records).as_py() or 0)
        return delta.to_pyarrow_dataset().count_rows()
    return read(spark, warehouse, table).count()


def _whole_files(delta) -> bool:
    """Whether every row of each data file is live: no deletion vectors (which reader version 3 allows)."""
    return delta.protocol().min_reader_version < 3


def whole_files(spark: SparkSession, warehouse: str, table: str) -> bool:
    """Whether ``table`` is mounted and free of deletion vectors (or missing): its files can be read directly."""
    folder = local_folder(spark, warehouse, table)
    if folder is None:
        return False
    from deltalake import DeltaTable

    return not exists(spark, warehouse, table) or _whole_files(DeltaTable(folder))


def locate(spark: SparkSession, warehouse: str, table: str, columns: list[str], version: int | None = None) -> pa.Table:
    """Small ``columns`` of every row of a mounted ``table``, with the ``data_file`` and ``row_group`` holding it.

    What a stage whose workers read their input files themselves plans its
    tasks from, and what a writer that replaces rows needs to know which
    files to remove.  Only for tables :func:`whole_files` accepts.
    """
    schema = arrow_schema(table, columns).append(pa.field("data_file", pa.string())).append(
        pa.field("row_group", pa.int32()))
    if not exists(spark, warehouse, table):
        return schema.empty_table()
    from deltalake import DeltaTable

    parts = []
    for fragment in DeltaTable(local_folder(spark, warehouse, table), version=version).to_pyarrow_dataset().get_fragments():
        for group in fragment.split_by_row_group():
            rows = group.to_table(columns=columns)
            parts.append(rows.append_column("data_file", pa.array([fragment.path] * rows.num_rows, pa.string()))
                         .append_column("row_group", pa.array([group.row_groups[0].id] * rows.num_rows, pa.int32())))
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def lookup(spark: SparkSession, warehouse: str, table: str, where: dict, columns: list[str]) -> pa.Table:
    """``columns`` (pixels too) of the few rows whose ``where`` columns are in the given values.

    Why not :func:`scan`: a filtered scan reads the pixel column of every row
    group its statistics cannot skip, and random UIDs skip none (1.85 s for
    the montage's one slice of 1024).  Here the key columns are read first
    (:func:`locate`) and then only the row groups that hold the rows.
    """
    if not whole_files(spark, warehouse, table) or not exists(spark, warehouse, table):
        return scan(spark, warehouse, table, columns, where)
    keys, condition = list(where), _condition(table, where)
    located = locate(spark, warehouse, table, keys)
    hits = located.filter(condition)
    folder = local_folder(spark, warehouse, table)
    parts = [pq.ParquetFile(os.path.join(folder, data_file)).read_row_group(group, columns=list(dict.fromkeys(keys + columns)))
             .filter(condition).select(columns)
             for data_file, group in sorted(set(zip(hits.column("data_file").to_pylist(),
                                                    hits.column("row_group").to_pylist())))]
    schema = arrow_schema(table, columns)
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


def read(spark: SparkSession, warehouse: str, table: str, version: int | None = None) -> DataFrame:
    """The table (at ``version``, else the latest) as a DataFrame; empty with the declared schema if missing."""
    if not exists(spark, warehouse, table):
        return spark.createDataFrame([], SCHEMAS[table])
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(table_path(warehouse, table))


def create_if_missing(spark: SparkSession, warehouse: str, table: str, schema: T.StructType | None = None) -> None:
    """An empty table with the declared schema (or ``schema``: column metadata too), so readers never meet a
    missing table.

    Where the warehouse is mounted, delta-rs writes the first commit (0.01 s against about 0.8 s for
    Spark's write job, paid per table by every run into a new warehouse); the commit is the one Spark
    would write: protocol (1, 2), no table properties, the same schema string.  Column metadata
    (``schema``, Spark ML attributes) has no Arrow form that delta-rs writes as Spark does, so such a
    table is created by Spark.
    """
    if exists(spark, warehouse, table):
        return
    folder = local_folder(spark, warehouse, table)
    try:
        if folder is not None and schema is None:
            from deltalake import CommitProperties, DeltaTable

            # The run that Spark's writer would name in the commit (see versions_by_run).
            run = spark.conf.get(USER_METADATA, None)
            DeltaTable.create(folder, arrow_schema(table), mode="ignore",
                              commit_properties=CommitProperties(custom_metadata={"userMetadata": run} if run else None))
        else:
            spark.createDataFrame([], schema or SCHEMAS[table]).write.format("delta").mode("ignore").save(
                table_path(warehouse, table))
    except Exception:
        # Two runs creating a new warehouse at once: the one whose first commit lost sees the table now.
        if not exists(spark, warehouse, table):
            raise


#: The session setting with which Spark's Delta writers record who committed (a run id).
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"


def add_missing_columns(spark: SparkSession, warehouse: str, table: str) -> None:
    """Add the declared columns an existing table lacks (older rows read them as null)."""
    folder = local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        present = set(DeltaTable(folder).schema().to_arrow().names)
    else:
        present = set(spark.read.format("delta").load(table_path(warehouse, table)).columns)
    missing = [f for f in SCHEMAS[table].fields if f.name not in present]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{table_path(warehouse, table)}` ADD COLUMNS ({columns})")


def merge_insert(spark: SparkSession, warehouse: str, table: str, rows: DataFrame, keys: list[str]) -> None:
    """Insert ``rows`` whose ``keys`` are not in ``table`` yet (creating it on first use).

    A MERGE keyed on the natural key makes a retried or repeated run a no-op
    instead of a source of duplicates.  A column the declared schema gained
    since the table was created is added (older rows read it as null).
    """
    _merge(spark, warehouse, table, rows, keys, update=False)


def merge_upsert(spark: SparkSession, warehouse: str, table: str, rows: DataFrame, keys: list[str]) -> None:
    """Insert new keys and replace the rows of existing ones (derived tables such as ``series``); evolves like
    :func:`merge_insert`."""
    _merge(spark, warehouse, table, rows, keys, update=True)


def _merge(spark: SparkSession, warehouse: str, table: str, rows: DataFrame, keys: list[str], update: bool) -> None:
    from delta.tables import DeltaTable

    path = table_path(warehouse, table)
    rows = rows.select(*SCHEMAS[table].fieldNames())
    if not exists(spark, warehouse, table):
        rows.write.format("delta").mode("errorifexists").save(path)
        return
    condition = " AND ".join(f"t.{k} <=> n.{k}" for k in keys)
    merge = DeltaTable.forPath(spark, path).alias("t").merge(rows.alias("n"), condition)
    if update:
        merge = merge.whenMatchedUpdateAll()
    merge.whenNotMatchedInsertAll().withSchemaEvolution().execute()


def upsert(spark: SparkSession, warehouse: str, table: str, rows: pa.Table, keys: list[str],
           operation: dict | None = None) -> None:
    """:func:`merge_upsert` of the driver's small ``rows`` (a derived table's changed rows, such as ``series``).

    Where the warehouse is mounted the MERGE is delta-rs's (no Spark job: about 0.05 s instead of 3 s),
    on a table made by :func:`create_if_missing`, so its schema and protocol are Spark's.
    ``operation`` goes into the commit's metadata (``ctlake.*`` keys), as in
    :func:`ctlake.spark.datafiles.commit`.
    """
    folder = local_folder(spark, warehouse, table)
    if folder is None:
        merge_upsert(spark, warehouse, table, spark.createDataFrame(rows, SCHEMAS[table]), keys)
        return
    from deltalake import CommitProperties, DeltaTable

    create_if_missing(spark, warehouse, table)
    add_missing_columns(spark, warehouse, table)
    condition = " AND ".join(f"t.{k} = n.{k}" for k in keys)
    from deltalake.exceptions import CommitFailedError

    properties = CommitProperties(custom_metadata=commit_metadata(operation))
    for attempt in range(_UPSERT_ATTEMPTS):
        try:
            (DeltaTable(folder).merge(rows.select(SCHEMAS[table].fieldNames()), condition, source_alias="n",
                                      target_alias="t", commit_properties=properties)
             .when_matched_update_all().when_not_matched_insert_all().execute())
            return
        except CommitFailedError:
            # A concurrent writer's commit conflicts with this MERGE's read; the MERGE is keyed, so again is safe.
            if attempt + 1 == _UPSERT_ATTEMPTS:
                raise


#: Times :func:`upsert` tries its MERGE against the latest version when concurrent commits conflict with it.
_UPSERT_ATTEMPTS = 20


def replace(spark: SparkSession, warehouse: str, table: str, rows: DataFrame) -> None:
    """Overwrite ``table`` with ``rows`` and their declared schema, column metadata included.

    For a derived table whose layout changed; the previous version stays
    readable by Delta time travel.
    """
    (rows.select(*SCHEMAS[table].fieldNames()).write.format("delta").mode("overwrite")
     .option("overwriteSchema", "true").save(table_path(warehouse, table)))


def version(spark: SparkSession, warehouse: str, table: str) -> int | None:
    """The table's latest Delta version (what a run records to time-travel back to its inputs)."""
    if not exists(spark, warehouse, table):
        return None
    folder = local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        return DeltaTable(folder).version()
    from delta.tables import DeltaTable

    return int(DeltaTable.forPath(spark, table_path(warehouse, table)).history(1).first()["version"])


def new_run_id(started: datetime) -> str:
    """A run's id (``runs``, ``ingest_runs``, commit metadata): sortable by start time, unique across concurrent runs."""
    return started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def commit_metadata(operation: dict | None) -> dict:
    """``operation`` (run id, stage) as the ``ctlake.*`` custom metadata of a delta-rs commit."""
    return {f"ctlake.{k}": str(v) for k, v in (operation or {}).items()}


def versions_by_run(spark: SparkSession, warehouse: str, table: str, run_id: str, since: int | None) -> list[int]:
    """The versions after ``since`` that ``run_id`` committed to ``table`` (its ``ctlake.run`` commit metadata).

    Spark's writers record the run as the commit's ``userMetadata`` (the
    session's ``spark.databricks.delta.commitInfo.userMetadata``), delta-rs
    commits as ``ctlake.run``; both are read from the table's history.
    """
    latest = version(spark, warehouse, table)
    if latest is None or (since is not None and latest <= since):
        return []
    folder = local_folder(spark, warehouse, table)
    limit = latest - (since if since is not None else -1)
    if folder is not None:
        from deltalake import DeltaTable

        history = DeltaTable(folder).history(limit)
    else:
        from delta.tables import DeltaTable

        history = [r.asDict() for r in DeltaTable.forPath(spark, table_path(warehouse, table)).history(limit).collect()]
    return sorted(int(c["version"]) for c in history
                  if run_id in (c.get("ctlake.run"), c.get("userMetadata")))


def latest_run_id(spark: SparkSession, warehouse: str) -> str:
    """The newest training run of this warehouse (``runs.started_at``); InputError when there is none."""
    newest = read(spark, warehouse, RUNS).orderBy(F.desc("started_at"), F.desc("run_id")).select("run_id").first()
    if newest is None:
        raise InputError(f"no training run in {table_path(warehouse, RUNS)}: run jobs/train.py first")
    return newest["run_id"]


# --------------------------------------------------------------------------- input CSVs

ANNOTATIONS_CSV = "seriesuid string, coordX double, coordY double, coordZ double, diameter_mm double"


def candidate_id(series_uid: Column, x: Column, y: Column, z: Column) -> Column:
    """The key that joins a candidate's patches to its row in ``nodules.csv``: series and centre (mm)."""
    return F.substring(F.sha2(F.concat_ws("|", series_uid, x, y, z), 256), 1, 16)


def _read_csv(spark: SparkSession, path: str, what: str, **options) -> DataFrame:
    try:
        frame = spark.read.csv(path, header=True, **options)
        frame.schema
    except Exception as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            raise InputError(f"{what} file not found: {path}") from exc
        raise
    return frame


def read_annotations(spark: SparkSession, path: str) -> DataFrame:
    """LUNA16 ``annotations.csv``: the true nodules (patient mm, diameter) with ``series_uid`` and ``nodule_key``.

    ``nodule_key`` is the nodule's key in ``nodules.csv`` (:func:`candidate_id` of its centre).
    """
    frame = _read_csv(spark, path, "annotations", schema=ANNOTATIONS_CSV, enforceSchema=False, mode="DROPMALFORMED")
    frame = frame.withColumnRenamed("seriesuid", "series_uid")
    return frame.withColumn("nodule_key", candidate_id(*[frame[c] for c in ("series_uid", "coordX", "coordY", "coordZ")]))


def read_candidates(spark: SparkSession, warehouse: str, detector: str) -> DataFrame:
    """The ``candidates`` rows found under one detector parameter hash (the others are another detector's)."""
    return read(spark, warehouse, CANDIDATES).filter(F.col("detector_hash") == detector)


def read_nodules(spark: SparkSession, path: str) -> DataFrame:
    """``nodules.csv`` -> ``candidate_id`` (the key of the candidate at the nodule) and its malignancy label."""
    nodules = _read_csv(spark, path, "nodules", inferSchema=False)
    coords = [F.col(c).cast("double") for c in ("coordX", "coordY", "coordZ")]
    return nodules.select(candidate_id(F.col("seriesuid"), *coords).alias("candidate_id"),
                          F.col("label").alias("nodule_label"), F.col("diameter_mm").cast("double").alias("nodule_mm"),
                          F.col("texture").cast("double").alias("nodule_texture"))


def read_nodule_attributes(spark: SparkSession, path: str, attributes: tuple[str, ...]) -> DataFrame:
    """``nodules.csv``: series, nodule key, label and the rendered ``attributes`` as doubles."""
    nodules = _read_csv(spark, path, "nodules", inferSchema=False)
    coords = [F.col(c).cast("double") for c in ("coordX", "coordY", "coordZ")]
    return nodules.select(F.col("seriesuid").alias("series_uid"), candidate_id(F.col("seriesuid"), *coords)
                          .alias("nodule_key"), "label", *[F.col(a).cast("double").alias(a) for a in attributes])


def read_labels(spark: SparkSession, path: str) -> DataFrame:
    """``labels.csv``: one row per series with its cancer label."""
    return _read_csv(spark, path, "labels", inferSchema=True)


# --------------------------------------------------------------------------- small text files

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

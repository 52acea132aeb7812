"""Ingestion: DICOM files -> de-identified ``slices``, ``series`` and ``quarantine`` Delta tables.

The run is incremental and idempotent by construction:

1. list the input with Spark's ``binaryFile`` source (metadata only, no bytes read);
2. drop every path already recorded in ``slices`` or ``quarantine``;
3. read and parse only the new files on the executors (pixels decoded once),
   staging the parsed rows as Parquet so nothing is decoded twice;
4. a file whose SOP instance is already ingested (or claimed by another new
   file) goes to ``quarantine`` as a ``duplicate``; the rest are MERGEd into
   ``slices`` keyed on (sop_uid, frame); rejections are MERGEd into
   ``quarantine`` keyed on source path;
5. ``series`` rows are recomputed for the series that gained slices.

A crash between steps leaves a state from which the next run converges.
"""
from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timezone
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from ctlake import config as cfg
from ctlake import tables
from ctlake.deid import Pseudonymizer, load_key
from ctlake.dicom import Rejection, parse_dicom
from ctlake.errors import ConfigError, InputError
from ctlake.geometry import summarize_series
from ctlake.progress import StageProgress

log = logging.getLogger("ctlake.ingest")

#: Spark's binaryFile source cannot hold a file of 2 GiB or more in one row.
MAX_FILE_BYTES = 2**31 - 1 - 1024

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)


def parse_size(value, key: str) -> int:
    """``64m`` / ``512k`` / ``1g`` / plain bytes -> bytes."""
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"configuration key {key} must be a size such as 64m, found {value!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    size = number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    if size <= 0:
        raise ConfigError(f"configuration key {key} must be positive, found {value!r}")
    return size


def validate(config: dict, input_path: str | None) -> None:
    """Check everything ingestion needs before any Spark work: fail in milliseconds, not minutes."""
    if not (input_path or cfg.get(config, "ingest.input", str, None)):
        raise ConfigError("no input: pass --input PATH or set ingest.input")
    cfg.get(config, "warehouse", str)
    parse_size(cfg.get(config, "ingest.max_partition_bytes", (str, int), "64m"), "ingest.max_partition_bytes")
    parse_size(cfg.get(config, "ingest.arrow_max_bytes_per_batch", (str, int), "32m"),
               "ingest.arrow_max_bytes_per_batch")
    load_key(config)


LISTING_SCHEMA = "path string, modificationTime timestamp, length long"


def list_files(spark: SparkSession, input_path: str) -> DataFrame:
    """Every file under ``input_path`` (folder, glob or Hadoop URI), without reading contents.

    Listed through the Hadoop FileSystem API rather than ``binaryFile``,
    because Spark's file sources silently drop empty files and names starting
    with ``.`` or ``_``; every file must be accounted for, so those are listed
    here and quarantined with their reason instead.
    """
    jvm = spark._jvm
    pattern = jvm.org.apache.hadoop.fs.Path(input_path)
    fs = pattern.getFileSystem(spark._jsc.hadoopConfiguration())
    statuses = fs.globStatus(pattern)
    if not statuses:
        raise InputError(f"input path not found: {input_path}")
    rows = []
    for status in statuses:
        if status.isFile():
            rows.append(_listing_row(status))
            continue
        files = fs.listFiles(status.getPath(), True)
        while files.hasNext():
            rows.append(_listing_row(files.next()))
    return spark.createDataFrame(rows, LISTING_SCHEMA)


def _listing_row(status) -> tuple:
    mtime = datetime.fromtimestamp(status.getModificationTime() / 1000, tz=timezone.utc)
    return status.getPath().toString(), mtime, int(status.getLen())


def _skip_reason(path: str, length: int) -> tuple[str, str] | None:
    """Files that are quarantined from their listing alone, without being opened."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if length == 0:
        return "not_dicom", "empty file"
    if name.startswith((".", "_")):
        return "hidden_file", "Spark file sources skip names starting with '.' or '_'; rename the file to ingest it"
    if length > MAX_FILE_BYTES:
        return "too_large", f"file of {length} bytes exceeds the 2 GiB a binaryFile row can hold"
    return None


def _escape_glob(path: str) -> str:
    """Hadoop treats []{}*? in a load path as a glob; a listed path must match only itself."""
    return re.sub(r"([\[\]{}*?\\])", r"\\\1", path)


def parse_partition(key: bytes, max_batch_bytes: int):
    """The mapInPandas body: parse each file, emit frame rows or one rejection row per file.

    Output batches are cut by bytes of pixel data, so a partition of large
    512x512 multi-frame files never builds one huge Arrow batch.
    """
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        pseudonymize = Pseudonymizer(key)
        out, size = [], 0
        for batch in batches:
            for path, mtime, length, content in zip(batch["path"], batch["modificationTime"],
                                                     batch["length"], batch["content"]):
                source = {"source_path": path, "source_size": int(length), "source_mtime": mtime}
                result = parse_dicom(bytes(content), pseudonymize)
                if isinstance(result, Rejection):
                    out.append({**source, "reason": result.reason, "message": result.message,
                                "sop_uid": result.sop_uid, "series_uid": result.series_uid,
                                "modality": result.modality, "transfer_syntax": result.transfer_syntax})
                else:
                    for record in result:
                        out.append({**record, **source})
                        size += len(record["pixels"])
                if size >= max_batch_bytes:
                    yield _frame(out)
                    out, size = [], 0
        if out:
            yield _frame(out)

    return run


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=tables.PARSED_SCHEMA.fieldNames()).astype(object)
    # Columns a rejection lacks come back as NaN; Arrow needs None for a null array or string.
    return frame.where(pd.notna(frame), None)


def run(spark: SparkSession, config: dict, input_path: str | None = None) -> dict:
    """Ingest every new file under the input; return the run summary (counts that add up)."""
    input_path = input_path or cfg.get(config, "ingest.input", str)
    validate(config, input_path)
    key = load_key(config)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    now = F.current_timestamp()
    max_batch_bytes = parse_size(cfg.get(config, "ingest.arrow_max_bytes_per_batch", (str, int), "32m"),
                                 "ingest.arrow_max_bytes_per_batch")
    spark.conf.set("spark.sql.files.maxPartitionBytes",
                   str(parse_size(cfg.get(config, "ingest.max_partition_bytes", (str, int), "64m"),
                                  "ingest.max_partition_bytes")))
    # Input batches to Python carry whole files: bound them by bytes as well as rows.
    spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(max_batch_bytes))
    progress_seconds = cfg.get(config, "ingest.progress_seconds", (int, float), 10)

    listing = list_files(spark, input_path)
    known = (tables.read(spark, config, tables.SLICES).select(F.col("source_path").alias("path"))
             .union(tables.read(spark, config, tables.QUARANTINE).select(F.col("source_path").alias("path")))
             .distinct())
    new_files = listing.join(known, "path", "left_anti").cache()
    files_seen = listing.count()
    new_count = new_files.count()
    log.info("%d files under %s, %d not ingested yet", files_seen, input_path, new_count)

    summary = {"run_id": run_id, "input": input_path, "files_seen": files_seen,
               "already_ingested": files_seen - new_count, "new_files": new_count,
               "files_ingested": 0, "slices_written": 0, "series_updated": 0, "quarantined": {}}
    if new_count == 0:
        summary.update(_totals(spark, config))
        return summary

    readable, skipped = [], []
    for row in new_files.collect():
        reason = _skip_reason(row.path, row.length)
        if reason is None:
            readable.append(row.path)
        else:
            skipped.append((row.path, row.length, row.modificationTime, *reason))
    staging = f"{cfg.get(config, 'warehouse', str).rstrip('/')}/_staging/ingest-{run_id}"
    if readable:
        files = (spark.read.format("binaryFile").option("ignoreMissingFiles", "true")
                 .load([_escape_glob(p) for p in readable]))
        parsed = files.mapInPandas(parse_partition(key, max_batch_bytes), tables.PARSED_SCHEMA)
        with StageProgress(spark.sparkContext, "ingest: parsing DICOM", progress_seconds):
            parsed.write.mode("overwrite").parquet(staging)
        staged = spark.read.parquet(staging)
    else:
        staged = spark.createDataFrame([], tables.PARSED_SCHEMA)
    unopened = spark.createDataFrame(
        skipped, "source_path string, source_size long, source_mtime timestamp, reason string, message string")

    frames = staged.filter(F.col("reason").isNull()).drop("reason", "message")
    accepted, duplicates = _split_duplicates(spark, config, frames)
    slices_new = accepted.withColumn("ingested_at", now).withColumn("ingest_run", F.lit(run_id))
    with StageProgress(spark.sparkContext, "ingest: writing slices", progress_seconds):
        tables.merge_insert(spark, config, tables.SLICES, slices_new, ["sop_uid", "frame"])

    rejected = staged.filter(F.col("reason").isNotNull()).select(
        "source_path", "source_size", "source_mtime", "reason", "message", "sop_uid", "series_uid",
        "modality", "transfer_syntax")
    quarantine = (rejected.unionByName(duplicates).unionByName(unopened, allowMissingColumns=True)
                  .withColumn("quarantined_at", now).withColumn("ingest_run", F.lit(run_id)))
    tables.merge_insert(spark, config, tables.QUARANTINE, quarantine, ["source_path"])

    series_updated = update_series(spark, config)

    this_run_slices = tables.read(spark, config, tables.SLICES).filter(F.col("ingest_run") == run_id)
    this_run_quarantine = tables.read(spark, config, tables.QUARANTINE).filter(F.col("ingest_run") == run_id)
    by_reason = {r["reason"]: r["count"] for r in this_run_quarantine.groupBy("reason").count().collect()}
    summary.update({
        "files_ingested": this_run_slices.select("source_path").distinct().count(),
        "slices_written": this_run_slices.count(),
        "series_updated": series_updated,
        "quarantined": dict(sorted(by_reason.items())),
    })
    summary.update(_totals(spark, config))
    _delete_path(spark, staging)
    new_files.unpersist()
    accounted = summary["files_ingested"] + sum(by_reason.values())
    if accounted != new_count:
        # A concurrent run may have claimed some files; say so rather than hide it.
        log.warning("%d new files but %d accounted for in this run", new_count, accounted)
    summary["accounted_for"] = accounted == new_count
    return summary


def _split_duplicates(spark: SparkSession, config: dict, frames: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Frames to insert, and one quarantine row per file whose SOP instance is already claimed.

    A file is the unit: it is a duplicate if its SOP instance is in ``slices``
    already, or another new file with the same instance sorts before it.
    """
    files = frames.select("source_path", "source_size", "source_mtime", "sop_uid", "series_uid",
                          "modality", "transfer_syntax").distinct()
    existing = (tables.read(spark, config, tables.SLICES).filter(F.col("frame") == 1)
                .select("sop_uid", F.col("source_path").alias("claimed_by")))
    first_claim = Window.partitionBy("sop_uid").orderBy("source_path")
    ranked = (files.withColumn("claimed_in_run", F.first("source_path").over(first_claim))
              .join(existing, "sop_uid", "left"))
    # Evaluated lazily, possibly after this run's slices are written: a file must
    # never count as claimed by itself, or it would become its own duplicate.
    is_duplicate = ((F.col("claimed_by").isNotNull() & (F.col("claimed_by") != F.col("source_path")))
                    | (F.col("claimed_in_run") != F.col("source_path")))
    duplicates = ranked.filter(is_duplicate).select(
        "source_path", "source_size", "source_mtime", F.lit("duplicate").alias("reason"),
        F.concat(F.lit("SOP instance "), F.col("sop_uid"), F.lit(" already ingested from "),
                 F.when(F.col("claimed_in_run") != F.col("source_path"), F.col("claimed_in_run"))
                 .otherwise(F.col("claimed_by"))).alias("message"),
        "sop_uid", "series_uid", "modality", "transfer_syntax")
    accepted = frames.join(duplicates.select("source_path"), "source_path", "left_anti")
    return accepted, duplicates


def update_series(spark: SparkSession, config: dict) -> int:
    """Recompute ``series`` rows for series that changed since they were last summarized."""
    slices = tables.read(spark, config, tables.SLICES).drop("pixels")
    latest = slices.groupBy("series_uid").agg(F.max("ingested_at").alias("last_ingest"))
    current = tables.read(spark, config, tables.SERIES).select("series_uid", "updated_at")
    stale = (latest.join(current, "series_uid", "left")
             .filter(F.col("updated_at").isNull() | (F.col("updated_at") < F.col("last_ingest")))
             .select("series_uid"))
    metadata = slices.join(stale, "series_uid", "left_semi").select(
        "series_uid", "study_uid", "patient_pseudonym", "modality", "manufacturer", "z_position", "rows",
        "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness",
        F.concat_ws(",", "image_orientation").alias("orientation"))
    summaries = (metadata.groupBy("series_uid").applyInPandas(_series_row, tables.SERIES_SCHEMA)
                 .withColumn("updated_at", F.current_timestamp()).cache())
    count = summaries.count()
    if count:
        tables.merge_upsert(spark, config, tables.SERIES, summaries, ["series_uid"])
    summaries.unpersist()
    return count


def _series_row(group: pd.DataFrame) -> pd.DataFrame:
    """One series' metadata rows (no pixels) -> its ``series`` row."""
    layout = summarize_series(group["z_position"].to_numpy())
    geometry_columns = ["rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "orientation"]
    first = group.iloc[0]
    row = {
        "series_uid": first["series_uid"], "study_uid": first["study_uid"],
        "patient_pseudonym": first["patient_pseudonym"], "modality": first["modality"],
        "manufacturer": first["manufacturer"], **layout,
        "consistent_geometry": bool(group[geometry_columns].drop_duplicates().shape[0] == 1),
        "rows": int(first["rows"]), "columns": int(first["columns"]),
        "pixel_spacing_row": float(first["pixel_spacing_row"]),
        "pixel_spacing_col": float(first["pixel_spacing_col"]),
        "slice_thickness": None if pd.isna(first["slice_thickness"]) else float(first["slice_thickness"]),
        "updated_at": None,
    }
    return pd.DataFrame([row], columns=tables.SERIES_SCHEMA.fieldNames())


def _totals(spark: SparkSession, config: dict) -> dict:
    return {
        "table_totals": {
            tables.SLICES: tables.read(spark, config, tables.SLICES).count(),
            tables.SERIES: tables.read(spark, config, tables.SERIES).count(),
            tables.QUARANTINE: tables.read(spark, config, tables.QUARANTINE).count(),
        }
    }


def _delete_path(spark: SparkSession, path: str) -> None:
    jvm = spark._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    hadoop_path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(hadoop_path, True)

"""Detection job: preprocessed series -> nodule ``candidates`` (one row each) and ``detections`` (one per series).

A series travels to Python once, as the rows of one group of a grouped
pandas UDF (its slices' HU pixels and lung masks, a few MB at 256 x 256 x 32),
and :func:`ctlake.core.detect.detect_series` finds its candidates there.  A
series that cannot be read as one stack is a ``detections`` row with its
error, not a failed job; a series with a ``detections`` row under the
current detector parameters is not detected again.
"""
from __future__ import annotations

import logging
import time

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ctlake.config import Settings
from ctlake.core.detect import DetectorParams, candidate_key, detect_series, detector_hash
from ctlake.spark import tables
from ctlake.spark.patches import slice_metadata
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.detect")

CANDIDATE_FIELDS = [f for f in tables.CANDIDATES_SCHEMA.fields if f.name not in ("detector_hash", "detected_at")]
#: What the grouped UDF returns per series: its status and its candidates.
SERIES_RESULT = T.StructType([
    T.StructField("series_uid", T.StringType()),
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("n_candidates", T.IntegerType()),
    T.StructField("seconds", T.DoubleType()),
    T.StructField("error", T.StringType()),
    T.StructField("candidates", T.ArrayType(T.StructType(CANDIDATE_FIELDS))),
])


def detect_udf(params: DetectorParams, p_hash: str):
    """applyInPandas body: one series' slice rows -> one SERIES_RESULT row."""
    names = [f.name for f in CANDIDATE_FIELDS]

    def run(group: pd.DataFrame) -> pd.DataFrame:
        first = group.iloc[0]
        started = time.monotonic()
        try:
            found = detect_series(group.to_dict("records"), params)
            error = None
        except Exception as exc:  # one unreadable series is a row with its reason, not a failed job
            found, error = [], f"{type(exc).__name__}: {exc}"
        lineage = {k: first[k] for k in ("patient_pseudonym", "study_uid", "series_uid")}
        rows = [{**lineage, **c, "candidate_id": candidate_key(first["series_uid"], c, p_hash)} for c in found]
        return pd.DataFrame([{
            "series_uid": first["series_uid"], "patient_pseudonym": first["patient_pseudonym"],
            "n_candidates": len(rows), "seconds": round(time.monotonic() - started, 3), "error": error,
            "candidates": [{k: r[k] for k in names} for r in rows]}])

    return run


def series_inputs(spark: SparkSession, settings: Settings, p_hash: str) -> DataFrame:
    """Every slice of the series without a ``detections`` row under ``p_hash``: pixels, geometry, lung mask."""
    warehouse = settings.warehouse
    chain_hash = settings.preprocess.chain().config_hash()
    done = (tables.read(spark, warehouse, tables.DETECTIONS).filter(F.col("detector_hash") == p_hash)
            .select("series_uid"))
    meta = slice_metadata(spark, warehouse).join(done, "series_uid", "left_anti")
    masks = (tables.read(spark, warehouse, tables.PREPROCESSED)
             .filter((F.col("chain_hash") == chain_hash))
             .select("sop_uid", "frame", F.when(F.col("mask_valid"), F.col("mask")).alias("mask")))
    pixels = tables.read(spark, warehouse, tables.SLICES).select("sop_uid", "frame", "pixels", "pixel_shape")
    return meta.join(pixels, ["sop_uid", "frame"]).join(masks, ["sop_uid", "frame"], "left")


def run(spark: SparkSession, settings: Settings) -> dict:
    """Detect candidates in every series not yet detected with the configured parameters."""
    warehouse, params = settings.warehouse, settings.detect.params()
    p_hash = detector_hash(params)
    for table in (tables.CANDIDATES, tables.DETECTIONS):
        tables.create_if_missing(spark, warehouse, table)
    inputs = series_inputs(spark, settings, p_hash)
    # A series is one task's work of a second or more: several groups per core keep the cores even
    # (measured: 4 shuffle partitions on 2 cores left one core idle for a third of the stage).
    spread = {"spark.sql.shuffle.partitions": str(8 * spark.sparkContext.defaultParallelism),
              "spark.sql.adaptive.coalescePartitions.enabled": "false"}
    with session_conf(spark, spread), StageProgress(spark.sparkContext, "detect", settings.detect.progress_seconds):
        results = (inputs.groupBy("series_uid").applyInPandas(detect_udf(params, p_hash), SERIES_RESULT)
                   .localCheckpoint())
        found = (results.select(F.explode("candidates").alias("c")).select("c.*")
                 .withColumn("detector_hash", F.lit(p_hash)).withColumn("detected_at", F.current_timestamp()))
        tables.merge_insert(spark, warehouse, tables.CANDIDATES, found, ["candidate_id"])
    status = (results.drop("candidates").withColumn("detector_hash", F.lit(p_hash))
              .withColumn("detected_at", F.current_timestamp()))
    # Statuses last: a series counts as detected only once its candidates are committed.
    tables.merge_upsert(spark, warehouse, tables.DETECTIONS, status, ["series_uid", "detector_hash"])
    new = status.agg(F.count("*").alias("series"), F.sum("n_candidates").alias("candidates"),
                     F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
                     F.avg("seconds").alias("seconds")).first()
    table = tables.read_candidates(spark, warehouse, p_hash)
    totals = table.agg(F.count("*").alias("n"), F.countDistinct("series_uid").alias("series")).first()
    return {"detector_hash": p_hash, "series_detected": new["series"], "candidates_found": new["candidates"] or 0,
            "series_errors": new["errors"] or 0, "seconds_per_series": round(new["seconds"] or 0.0, 2),
            "table_candidates": totals["n"], "table_series": totals["series"]}

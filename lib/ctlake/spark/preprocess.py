"""Preprocessing job: run the configured OpenCV chain over ``slices`` into ``preprocessed``.

The image maths lives in :mod:`ctlake.imaging` (pure numpy/OpenCV); this
module only moves bytes in and out of an iterator-style pandas UDF, so a slice
processed here is pixel-for-pixel what ``PreprocessChain.apply`` gives on the
same array outside Spark.

Incremental: a slice is processed when ``preprocessed`` has no row for it
under the current chain's hash; changing any step or parameter changes the
hash, so the whole table is reprocessed (rows are replaced, not duplicated).
"""
from __future__ import annotations

import logging
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ctlake.config import Settings
from ctlake.core.dicom_parse import hu_frame
from ctlake.core.slice_ops import PreprocessChain, montage, slice_quality
from ctlake.spark import tables
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.preprocess")


def process_slice(chain: PreprocessChain, hu: np.ndarray) -> dict:
    """One slice through the chain: packed outputs and quality figures (the UDF's row)."""
    result = chain.apply(hu)
    mask = result["mask"]
    quality = slice_quality(hu, mask) if mask is not None else \
        {"lung_fraction": None, "lung_mean_hu": None, "mask_valid": None}
    return {
        "image": result["image"].tobytes() if result["image"] is not None else None,
        "mask": mask.tobytes() if mask is not None else None,
        "threshold": result["threshold"].tobytes() if result["threshold"] is not None else None,
        **quality,
        "error": None,
    }


def preprocess_partition(steps: list[dict]):
    """mapInPandas body: slice rows -> ``preprocessed`` rows; the chain is built once per task.

    Iterator-style (a pandas function over an iterator of batches) so the
    chain's set-up happens once per task, not per batch.  mapInPandas rather
    than a struct-returning pandas UDF: the UDF made the JVM hold each 512 KB
    input row until its result came back (measured: 40% more JVM time).
    A slice that fails (it should not; a corrupt row might) yields a row with
    ``error`` set instead of failing the task.
    """
    lineage = [f.name for f in tables.LINEAGE_FIELDS] + ["z_position"]
    columns = [f.name for f in PARTITION_OUTPUT.fields]

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        # Spark runs one Python worker per core already; OpenCV's own threads would oversubscribe.
        cv2.setNumThreads(1)
        chain = PreprocessChain.from_config(steps)
        for batch in batches:
            rows = []
            for record in batch.to_dict("records"):
                base = {k: record[k] for k in lineage}
                base["image_shape"] = [int(v) for v in record["pixel_shape"]]
                try:
                    rows.append({**base, **process_slice(chain, hu_frame(record["pixels"], record["pixel_shape"]))})
                except Exception as exc:  # one bad row must not kill the job
                    rows.append({**base, "error": f"{type(exc).__name__}: {exc}"})
            frame = pd.DataFrame(rows, columns=columns).astype(object)
            yield frame.where(pd.notna(frame), None)

    return run


PARTITION_OUTPUT = T.StructType([f for f in tables.PREPROCESSED_SCHEMA.fields
                                 if f.name not in ("chain_hash", "processed_at")])


def pending_slices(spark: SparkSession, warehouse: str, chain_hash: str) -> DataFrame:
    """Slices with no ``preprocessed`` row under this chain hash."""
    done = (tables.read(spark, warehouse, tables.PREPROCESSED)
            .filter(F.col("chain_hash") == chain_hash).select("sop_uid", "frame"))
    return tables.read(spark, warehouse, tables.SLICES).join(done, ["sop_uid", "frame"], "left_anti")


def transform(slices: DataFrame, chain: PreprocessChain) -> DataFrame:
    """slices -> preprocessed rows (DataFrame to DataFrame, chainable with ``.transform``)."""
    inputs = slices.select(*[f.name for f in tables.LINEAGE_FIELDS], "z_position", "pixels", "pixel_shape")
    return (inputs.mapInPandas(preprocess_partition(chain.steps), PARTITION_OUTPUT)
            .withColumn("chain_hash", F.lit(chain.config_hash()))
            .withColumn("processed_at", F.current_timestamp()))


def run(spark: SparkSession, settings: Settings) -> dict:
    """Run the configured chain over every slice it has not processed yet; summary with the table's figures."""
    warehouse, chain = settings.warehouse, settings.preprocess.chain()
    chain_hash = chain.config_hash()
    todo = pending_slices(spark, warehouse, chain_hash)
    # Count keys only: caching the pixels just to count them cost more than processing them.
    pending = todo.select("sop_uid", "frame").count()
    total = tables.read(spark, warehouse, tables.SLICES).count()
    log.info("%d of %d slices need chain %s", pending, total, chain_hash)
    summary = {"chain_hash": chain_hash, "steps": [s["step"] for s in chain.steps],
               "slices_total": total, "slices_processed": 0}
    if pending:
        # Slices travel to Python in Arrow batches bounded by bytes, not by a row count.
        with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                                  settings.preprocess.arrow_max_bytes_per_batch}), \
                StageProgress(spark.sparkContext, "preprocess", settings.preprocess.progress_seconds):
            tables.merge_upsert(spark, warehouse, tables.PREPROCESSED, todo.transform(lambda df: transform(df, chain)),
                                ["sop_uid", "frame"])
        summary["slices_processed"] = pending
    pre = tables.read(spark, warehouse, tables.PREPROCESSED).filter(F.col("chain_hash") == chain_hash)
    stats = pre.agg(F.count("*").alias("rows"),
                    F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
                    F.sum(F.coalesce(F.col("mask_valid"), F.lit(False)).cast("int")).alias("valid_masks"),
                    F.avg("lung_fraction").alias("mean_lung_fraction")).first()
    summary.update({"table_rows": stats["rows"], "errors": stats["errors"] or 0,
                    "valid_lung_masks": stats["valid_masks"] or 0,
                    "mean_lung_fraction": round(stats["mean_lung_fraction"] or 0.0, 4)})
    picture = write_montage(spark, settings, chain, pre)
    if picture:
        summary["montage"] = picture
    return summary


def write_montage(spark: SparkSession, settings: Settings, chain: PreprocessChain, pre: DataFrame) -> str | None:
    """PNG of the slice with the most lung through every stage of the chain.

    One slice is brought to the driver and run through the same pure chain,
    so the picture shows exactly what the executors computed.
    """
    best = (pre.filter(F.col("mask_valid")).orderBy(F.desc("lung_fraction"), "sop_uid")
            .select("sop_uid", "frame").limit(1).collect())
    if not best:
        return None
    row = (tables.read(spark, settings.warehouse, tables.SLICES)
           .filter((F.col("sop_uid") == best[0]["sop_uid"]) & (F.col("frame") == best[0]["frame"]))
           .select("pixels", "pixel_shape").first())
    result = chain.apply(hu_frame(row["pixels"], row["pixel_shape"]))
    path = tables.report_file(settings.report.folder, tables.MONTAGE_PNG)
    cv2.imwrite(str(path), montage(result["stages"], result["mask"]))
    return str(path)

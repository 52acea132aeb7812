"""Feature job: ``patches`` -> ``features`` (radiomics-style figures and the pixel baseline).

The maths is in :mod:`ctlake.core.radiomics` and :mod:`ctlake.core.nodule3d`; this module moves patch bytes through
an iterator pandas UDF and records the feature names in the column metadata,
so a model's explanation can name every input and a scoring run can check
that its feature layout matches the one the model was trained on.
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
from ctlake.core.patch_tasks import params_hash
from ctlake.core.radiomics import FEATURE_NAMES, feature_layout, patch_features, pixel_vector
from ctlake.spark import tables
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.features")


def feature_udf(pixel_size: int):
    """(pixels, shape, pixel mm, slice mm) -> struct(radiomics, pixel_vector, error), per patch."""
    result = T.StructType([T.StructField("radiomics", T.ArrayType(T.DoubleType())),
                           T.StructField("pixel_vector", T.ArrayType(T.FloatType())),
                           T.StructField("error", T.StringType())])

    @F.pandas_udf(result)
    def compute(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        cv2.setNumThreads(1)
        for pixels, shapes, pixel_mm, slice_mm in batches:
            rows = []
            for data, shape, spacing, thickness in zip(pixels, shapes, pixel_mm, slice_mm):
                try:
                    patch = np.frombuffer(data, "<i2").reshape(tuple(shape))
                    rows.append({"radiomics": patch_features(patch, float(spacing),
                                                             None if pd.isna(thickness) else float(thickness)),
                                 "pixel_vector": pixel_vector(patch, pixel_size), "error": None})
                except Exception as exc:  # a bad patch is a row with an error, not a failed job
                    rows.append({"radiomics": None, "pixel_vector": None, "error": f"{type(exc).__name__}: {exc}"})
            yield pd.DataFrame(rows, columns=["radiomics", "pixel_vector", "error"])

    return compute


def transform(patch_rows: DataFrame, series: DataFrame, pixel_size: int) -> DataFrame:
    """patches (+ series spacing) -> feature rows; chainable with ``.transform``."""
    spacing = series.select("series_uid", F.col("spacing_mm").alias("series_mm"))
    px = (patch_rows.join(spacing, "series_uid", "left")
          .withColumn("pixel_mm", F.col("size_mm") / F.element_at("patch_shape", -1))
          .withColumn("slice_mm", F.coalesce("channel_spacing_mm", "series_mm")))
    out = feature_udf(pixel_size)(F.col("pixels"), F.col("patch_shape"), F.col("pixel_mm"), F.col("slice_mm"))
    schema = tables.features_schema(pixel_size)
    keep = [f.name for f in schema.fields if f.name not in ("radiomics", "pixel_vector", "layout_hash", "error",
                                                            "computed_at")]
    frame = (px.select(*keep, out.alias("f")).select(*keep, "f.*")
             .withColumn("layout_hash", F.lit(feature_layout(pixel_size)["hash"]))
             .withColumn("computed_at", F.current_timestamp()))
    # Re-apply the declared schema so the feature names travel in the column metadata.
    return frame.select([F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema.fields])


def run(spark: SparkSession, settings: Settings) -> dict:
    """Features for every patch of the configured cut without them under the current layout."""
    warehouse, pixel_size = settings.warehouse, settings.features.pixel_size
    current = feature_layout(pixel_size)
    digest = current["hash"]
    existing = tables.read(spark, warehouse, tables.FEATURES)
    # Names live in the column metadata, which a MERGE cannot change: a new layout rewrites the table
    # (the old one stays reachable by time travel) instead of mixing layouts in one column.
    relayout = tables.exists(spark, warehouse, tables.FEATURES) and (
        tables.feature_names(existing, "radiomics") != current["radiomics"]
        or tables.feature_names(existing, "pixel_vector") != list(current["pixels"]))
    done = (spark.createDataFrame([], "patch_id string") if relayout
            else existing.filter(F.col("layout_hash") == digest).select("patch_id"))
    # Only patches cut under the configured parameters: a table may also hold older cuts.
    p_hash = params_hash(settings.patches.params())
    todo = (tables.read(spark, warehouse, tables.PATCHES).filter(F.col("params_hash") == p_hash)
            .join(done, "patch_id", "left_anti").cache())
    pending = todo.count()
    if pending or relayout:
        if relayout:
            log.info("feature layout changed to %s: recomputing every patch and rewriting the table", digest)
        with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                                  settings.features.arrow_max_bytes_per_batch}), \
                StageProgress(spark.sparkContext, "features", settings.features.progress_seconds):
            rows = transform(todo, tables.read(spark, warehouse, tables.SERIES), pixel_size)
            if relayout:
                tables.replace(spark, warehouse, tables.FEATURES, rows)
            else:
                tables.merge_upsert(spark, warehouse, tables.FEATURES, rows, ["patch_id"])
    todo.unpersist()
    table = tables.read(spark, warehouse, tables.FEATURES).filter((F.col("layout_hash") == digest)
                                                                   & (F.col("params_hash") == p_hash))
    stats = table.agg(F.count("*").alias("rows"), F.sum(F.col("error").isNotNull().cast("int")).alias("errors")).first()
    return {"layout_hash": digest, "patch_params_hash": p_hash, "radiomics_features": len(FEATURE_NAMES),
            "pixel_features": pixel_size ** 2, "table_rewritten_for_new_layout": relayout,
            "patches_featurized": pending, "table_rows": stats["rows"], "errors": stats["errors"] or 0}

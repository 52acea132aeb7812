"""Feature job: ``patches`` -> ``features`` (radiomics-style figures and the pixel baseline).

The maths is in :mod:`ctlake.features`; this module moves patch bytes through
an iterator pandas UDF and records the feature names in the column metadata,
so a model's explanation can name every input and a scoring run can check
that its feature layout matches the one the model was trained on.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
from ctlake import config as cfg
from ctlake.core.radiomics import FEATURE_NAMES, patch_features, pixel_names, pixel_vector
from ctlake.spark import patches, tables
from ctlake.spark.patches import PATCHES_SCHEMA
from ctlake.spark.progress import StageProgress
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger("ctlake.featurize")

FEATURES = "features"


def layout(pixel_size: int) -> dict:
    """Names of both feature vectors and a short hash of them (the layout a model depends on)."""
    names = {"radiomics": list(FEATURE_NAMES), "pixels": pixel_names(pixel_size)}
    digest = hashlib.sha256(repr(names).encode()).hexdigest()[:12]
    return {**names, "hash": digest}


def features_schema(pixel_size: int) -> T.StructType:
    names = layout(pixel_size)
    keep = [f for f in PATCHES_SCHEMA.fields if f.name not in ("pixels", "patch_shape", "pixel_dtype",
                                                               "created_at")]
    return T.StructType(keep + [
        T.StructField("radiomics", T.ArrayType(T.DoubleType()),
                      metadata={"ctlake.feature_names": names["radiomics"]}),
        T.StructField("pixel_vector", T.ArrayType(T.FloatType()),
                      metadata={"ctlake.feature_names": names["pixels"]}),
        T.StructField("layout_hash", T.StringType()),
        T.StructField("error", T.StringType()),
        T.StructField("computed_at", T.TimestampType()),
    ])


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
    schema = features_schema(pixel_size)
    keep = [f.name for f in schema.fields if f.name not in ("radiomics", "pixel_vector", "layout_hash", "error",
                                                            "computed_at")]
    frame = (px.select(*keep, out.alias("f")).select(*keep, "f.*")
             .withColumn("layout_hash", F.lit(layout(pixel_size)["hash"]))
             .withColumn("computed_at", F.current_timestamp()))
    # Re-apply the declared schema so the feature names travel in the column metadata.
    return frame.select([F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema.fields])


def run(spark: SparkSession, config: dict) -> dict:
    pixel_size = cfg.positive_int(config, "features.pixel_size", 16)
    tables.SCHEMAS[FEATURES] = features_schema(pixel_size)
    current = layout(pixel_size)
    digest = current["hash"]
    existing = tables.read(spark, config, FEATURES)
    # Names live in the column metadata, which a MERGE cannot change: a new layout rewrites the table
    # (the old one stays reachable by time travel) instead of mixing layouts in one column.
    relayout = tables.exists(spark, config, FEATURES) and (
        feature_names(existing, "radiomics") != current["radiomics"]
        or feature_names(existing, "pixel_vector") != list(current["pixels"]))
    done = (spark.createDataFrame([], "patch_id string") if relayout
            else existing.filter(F.col("layout_hash") == digest).select("patch_id"))
    # Only patches cut under the configured parameters: a table may also hold older cuts.
    p_hash = patches.params_hash(patches.params_from_config(config))
    todo = (tables.read(spark, config, tables.PATCHES).filter(F.col("params_hash") == p_hash)
            .join(done, "patch_id", "left_anti").cache())
    pending = todo.count()
    if pending or relayout:
        if relayout:
            log.info("feature layout changed to %s: recomputing every patch and rewriting the table", digest)
        spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch",
                       str(cfg.size_bytes(config, "features.arrow_max_bytes_per_batch", "8m")))
        with StageProgress(spark.sparkContext, "features", cfg.get(config, "features.progress_seconds",
                                                                  (int, float), 10)):
            rows = transform(todo, tables.read(spark, config, tables.SERIES), pixel_size)
            if relayout:
                tables.replace(spark, config, FEATURES, rows)
            else:
                tables.merge_upsert(spark, config, FEATURES, rows, ["patch_id"])
    todo.unpersist()
    table = tables.read(spark, config, FEATURES).filter((F.col("layout_hash") == digest)
                                                        & (F.col("params_hash") == p_hash))
    stats = table.agg(F.count("*").alias("rows"), F.sum(F.col("error").isNotNull().cast("int")).alias("errors")).first()
    return {"layout_hash": digest, "patch_params_hash": p_hash, "radiomics_features": len(FEATURE_NAMES),
            "pixel_features": pixel_size ** 2, "table_rewritten_for_new_layout": relayout,
            "patches_featurized": pending, "table_rows": stats["rows"], "errors": stats["errors"] or 0}


def feature_names(df: DataFrame, column: str) -> list[str]:
    """The names recorded in a features column's metadata."""
    return list(df.schema[column].metadata.get("ctlake.feature_names", []))

"""Feature job: ``patches`` -> ``features`` (radiomics-style figures and the pixel baseline).

The maths is in :mod:`ctlake.core.radiomics` and :mod:`ctlake.core.nodule3d`; this module moves
patch rows in and out of it as Arrow (:func:`feature_rows`) and records the feature names in the
column metadata, so a model's explanation can name every input and a scoring run can check that
its feature layout matches the one the model was trained on.

Where the warehouse is mounted the Python workers read their ``patches`` row groups and write
``features`` files themselves, and the driver commits them (:mod:`ctlake.spark.datafiles`);
elsewhere, and when a new layout rewrites the table, Spark reads and writes.
"""
from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ctlake.config import Settings
from ctlake.core.patch_tasks import params_hash
from ctlake.core.radiomics import FEATURE_NAMES, feature_layout, patch_features, pixel_vector
from ctlake.spark import datafiles, tables
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.features")

#: The ``features`` columns carried over from ``patches`` as they are.
CARRIED = [f.name for f in tables.FEATURES_SCHEMA.fields
           if f.name not in ("radiomics", "pixel_vector", "layout_hash", "error", "computed_at")]
#: What a worker reads of a ``patches`` row: the carried columns and the patch.
INPUT_COLUMNS = CARRIED + ["pixels", "patch_shape"]
#: ``series_mm``: the series' slice spacing, the distance between channels of a 2D/2.5D patch.
SERIES_MM = "series_mm"
_KEY = ["patch_id"]


def feature_rows(rows: pa.Table, pixel_size: int, stamp: dict) -> pa.Table:
    """``patches`` rows (:data:`INPUT_COLUMNS` and ``series_mm``) -> ``features`` rows, as Arrow.

    ``stamp``: the layout hash and computation time every row of the run
    carries.  A patch the maths rejects (malformed, say) gets a row with
    ``error`` set instead of failing the task.
    """
    schema = tables.arrow_schema(tables.FEATURES)
    radiomics, vectors, errors = [], [], []
    for data, shape, size_mm, channel_mm, series_mm in zip(
            *(rows.column(c).to_pylist() for c in ("pixels", "patch_shape", "size_mm", "channel_spacing_mm",
                                                    SERIES_MM))):
        thickness = channel_mm if channel_mm is not None else series_mm
        try:
            patch = np.frombuffer(data, "<i2").reshape(tuple(shape))
            radiomics.append(patch_features(patch, size_mm / shape[-1],
                                            None if thickness is None or math.isnan(thickness) else thickness)
                             .tolist())
            vectors.append(pixel_vector(patch, pixel_size).tolist())
            errors.append(None)
        except Exception as exc:  # a bad patch is a row with an error, not a failed job
            radiomics.append(None)
            vectors.append(None)
            errors.append(f"{type(exc).__name__}: {exc}")
    columns = {name: rows.column(name) for name in CARRIED}
    columns.update({"radiomics": pa.array(radiomics, schema.field("radiomics").type),
                    "pixel_vector": pa.array(vectors, schema.field("pixel_vector").type),
                    "error": pa.array(errors, pa.string())})
    for name, value in stamp.items():
        columns[name] = pa.array([value] * rows.num_rows, schema.field(name).type)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def run_stamp(pixel_size: int) -> dict:
    """What every row of one run carries: the feature layout's hash and one computation time."""
    return {"layout_hash": feature_layout(pixel_size)["hash"], "computed_at": datetime.now(UTC)}


def transform(patch_rows: DataFrame, series: DataFrame, pixel_size: int, stamp: dict) -> DataFrame:
    """patches (+ series spacing) -> feature rows with the names in the column metadata; chainable with ``.transform``.

    mapInArrow with :func:`feature_rows`: the same rows the direct writer makes.
    """
    spacing = series.select("series_uid", F.col("spacing_mm").alias(SERIES_MM))
    inputs = patch_rows.join(F.broadcast(spacing), "series_uid", "left").select(*INPUT_COLUMNS, SERIES_MM)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cv2.setNumThreads(1)
        for batch in batches:
            yield from feature_rows(pa.Table.from_batches([batch]), pixel_size, stamp).to_batches()

    frame = inputs.mapInArrow(run, tables.FEATURES_SCHEMA)
    return frame.select([F.col(f.name).alias(f.name, metadata=f.metadata) for f in tables.features_schema(pixel_size)])


def run(spark: SparkSession, settings: Settings) -> dict:
    """Features for every patch of the configured cut without them under the current layout."""
    warehouse, pixel_size = settings.warehouse, settings.features.pixel_size
    digest = feature_layout(pixel_size)["hash"]
    p_hash = params_hash(settings.patches.params())
    # Names live in the column metadata, which a commit of new rows cannot change: a new layout rewrites the
    # table (the old one stays reachable by time travel) instead of mixing layouts in one column.
    relayout = tables.exists(spark, warehouse, tables.FEATURES) and _names_changed(spark, warehouse, pixel_size)
    direct = (not relayout and datafiles.direct(spark, settings.table_writer, warehouse)
              and tables.whole_files(spark, warehouse, tables.PATCHES)
              and tables.whole_files(spark, warehouse, tables.FEATURES))
    if relayout:
        log.info("feature layout changed to %s: recomputing every patch and rewriting the table", digest)
    pending = (_run_direct if direct else _run_with_spark)(spark, settings, p_hash, relayout)
    rows = tables.scan(spark, warehouse, tables.FEATURES, ["error"], {"layout_hash": [digest], "params_hash": [p_hash]})
    return {"layout_hash": digest, "patch_params_hash": p_hash, "radiomics_features": len(FEATURE_NAMES),
            "pixel_features": pixel_size ** 2, "table_rewritten_for_new_layout": relayout,
            "patches_featurized": pending, "table_rows": rows.num_rows,
            "errors": rows.num_rows - rows.column("error").null_count}


def _names_changed(spark: SparkSession, warehouse: str, pixel_size: int) -> bool:
    current = feature_layout(pixel_size)
    existing = tables.read(spark, warehouse, tables.FEATURES)
    return (tables.feature_names(existing, "radiomics") != current["radiomics"]
            or tables.feature_names(existing, "pixel_vector") != list(current["pixels"]))


def _run_with_spark(spark: SparkSession, settings: Settings, p_hash: str, relayout: bool) -> int:
    """Spark's reader and Delta MERGE (or, for a new layout, an overwrite); patches featurized."""
    warehouse, pixel_size = settings.warehouse, settings.features.pixel_size
    stamp = run_stamp(pixel_size)
    done = (spark.createDataFrame([], "patch_id string") if relayout
            else tables.read(spark, warehouse, tables.FEATURES).filter(F.col("layout_hash") == stamp["layout_hash"])
            .select("patch_id"))
    # Only patches cut under the configured parameters: a table may also hold older cuts.
    todo = (tables.read(spark, warehouse, tables.PATCHES).filter(F.col("params_hash") == p_hash)
            .join(F.broadcast(done), "patch_id", "left_anti"))
    pending = todo.select("patch_id").count()
    if pending or relayout:
        with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                                  settings.features.arrow_max_bytes_per_batch}), \
                StageProgress(spark.sparkContext, "features", settings.features.progress_seconds):
            rows = transform(todo, tables.read(spark, warehouse, tables.SERIES), pixel_size, stamp)
            if relayout:
                tables.replace(spark, warehouse, tables.FEATURES, rows)
            else:
                tables.merge_upsert(spark, warehouse, tables.FEATURES, rows, _KEY)
    return pending


def _run_direct(spark: SparkSession, settings: Settings, p_hash: str, relayout: bool) -> int:
    """One pass: workers read the pending patches' row groups and write ``features`` files; one commit.

    Pending patches are found from the key columns alone (delta-rs on the
    driver); the commit replaces rows of the same patches made under another
    layout hash and keeps a rival run's rows (:func:`datafiles.commit_replacing`).
    """
    warehouse, pixel_size = settings.warehouse, settings.features.pixel_size
    stamp = run_stamp(pixel_size)
    version = datafiles.ensure_table(spark, warehouse, tables.FEATURES, tables.features_schema(pixel_size))
    cut = tables.locate(spark, warehouse, tables.PATCHES, _KEY + ["params_hash"])
    cut = cut.filter(pc.equal(cut.column("params_hash"), p_hash))
    existing = tables.locate(spark, warehouse, tables.FEATURES, _KEY + ["layout_hash"], version)
    done = datafiles.current_keys(existing, _KEY, "layout_hash", stamp["layout_hash"])
    pending = cut.filter(pc.invert(pc.is_in(cut.column("patch_id"), value_set=done)))
    log.info("%d of %d patches need features under layout %s", pending.num_rows, cut.num_rows, stamp["layout_hash"])
    if pending.num_rows == 0:
        return 0
    spacing = tables.scan(spark, warehouse, tables.SERIES, ["series_uid", "spacing_mm"])
    source = datafiles.row_group_tasks(spark, pending, tables.local_folder(spark, warehouse, tables.PATCHES), _KEY)
    body = write_partition(tables.local_folder(spark, warehouse, tables.FEATURES), pixel_size, stamp,
                           dict(zip(spacing.column("series_uid").to_pylist(), spacing.column("spacing_mm").to_pylist())))
    with StageProgress(spark.sparkContext, "features", settings.features.progress_seconds):
        written = datafiles.collected(source.mapInArrow(body, datafiles.WRITTEN_SCHEMA).collect())
    return datafiles.commit_replacing(spark, warehouse, tables.FEATURES, written,
                                      set(pending.column("patch_id").to_pylist()), _KEY,
                                      ("layout_hash", stamp["layout_hash"]), version, existing,
                                      {"stage": "features", "layout": stamp["layout_hash"]})


def write_partition(folder: str, pixel_size: int, stamp: dict, series_mm: dict[str, float | None]):
    """The mapInArrow body of the direct writer: each task's patches read, featurized and written here."""
    schema = tables.arrow_schema(tables.FEATURES)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cv2.setNumThreads(1)
        writer = datafiles.FileWriter(folder, schema, datafiles.PIXEL_CODEC)
        for batch in batches:
            for task in batch.to_pylist():
                rows = datafiles.task_rows(task, INPUT_COLUMNS, _KEY)
                if rows.num_rows:
                    spacing = pa.array([series_mm.get(s) for s in rows.column("series_uid").to_pylist()], pa.float64())
                    writer.write(feature_rows(rows.append_column(SERIES_MM, spacing), pixel_size, stamp))
        yield datafiles.written_batch(writer.close())

    return run

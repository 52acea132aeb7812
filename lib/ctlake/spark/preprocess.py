"""Preprocessing job: run the configured OpenCV chain over ``slices`` into ``preprocessed``.

The image maths lives in :mod:`ctlake.core.slice_ops` (pure numpy/OpenCV); this
module only moves Arrow rows in and out of it (:func:`processed_rows`), so a
slice processed here is pixel-for-pixel what ``PreprocessChain.apply`` gives
on the same array outside Spark.  Where the warehouse is mounted the Python
workers read ``slices`` and write ``preprocessed`` files themselves and the
driver commits them (:mod:`ctlake.spark.datafiles`); elsewhere Spark reads and
MERGEs.

Incremental: a slice is processed when ``preprocessed`` has no row for it
under the current chain's hash; changing any step or parameter changes the
hash, so the whole table is reprocessed (rows are replaced, not duplicated).
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ctlake.config import Settings
from ctlake.core.dicom_parse import hu_frame
from ctlake.core.slice_ops import PreprocessChain, montage, slice_quality
from ctlake.spark import datafiles, tables
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


#: The ``slices`` columns the chain reads (and ``_KEY``, the key of both tables).
INPUT_COLUMNS = [f.name for f in tables.LINEAGE_FIELDS] + ["z_position", "pixels", "pixel_shape"]
_KEY = ["sop_uid", "frame"]


def processed_rows(chain: PreprocessChain, rows: pa.Table, stamp: dict) -> pa.Table:
    """``slices`` rows -> ``preprocessed`` rows (``stamp``: chain hash, processing time), as Arrow.

    Columnar: lineage columns are carried over as they are and only the
    per-slice outputs are built row by row (a Python dict per row, as
    pandas' ``to_dict("records")`` made, cost more than the image work on
    small slices).  A slice that fails (it should not; a corrupt row might)
    gets a row with ``error`` set instead of failing the task.
    """
    schema = tables.arrow_schema(tables.PREPROCESSED)
    results = []
    for pixels, shape in zip(rows.column("pixels").to_pylist(), rows.column("pixel_shape").to_pylist()):
        try:
            results.append(process_slice(chain, hu_frame(pixels, shape)))
        except Exception as exc:  # one bad row must not kill the job
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    columns = {name: rows.column(name) for name in INPUT_COLUMNS[:-2]}
    columns["image_shape"] = rows.column("pixel_shape")
    for field in tables.PREPROCESS_RESULT.fields:
        columns[field.name] = pa.array([r.get(field.name) for r in results], schema.field(field.name).type)
    for name, value in stamp.items():
        columns[name] = pa.array([value] * rows.num_rows, schema.field(name).type)
    return pa.table([_chunked(columns[f.name]).cast(f.type) for f in schema], schema=schema)


def _chunked(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def run_stamp(chain: PreprocessChain) -> dict:
    """What every row of one run carries: the chain's hash and one processing time."""
    return {"chain_hash": chain.config_hash(), "processed_at": datetime.now(UTC)}


def transform(slices: DataFrame, chain: PreprocessChain) -> DataFrame:
    """slices -> preprocessed rows (DataFrame to DataFrame, chainable with ``.transform``).

    mapInArrow, iterator-style: the chain is set up once per task, and no
    pandas object columns are made for the pixels.  (A struct-returning
    pandas UDF made the JVM hold each 512 KB input row until its result
    came back: 40% more JVM time.)
    """
    steps, stamp = chain.steps, run_stamp(chain)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # Spark runs one Python worker per core already; OpenCV's own threads would oversubscribe.
        cv2.setNumThreads(1)
        task_chain = PreprocessChain.from_config(steps)
        for batch in batches:
            yield from processed_rows(task_chain, pa.Table.from_batches([batch]), stamp).to_batches()

    return slices.select(*INPUT_COLUMNS).mapInArrow(run, tables.PREPROCESSED_SCHEMA)


def write_partition(steps: list[dict], folder: str, stamp: dict):
    """The mapInArrow body of the direct writer: each task row group read, processed and written here.

    The worker reads its row groups of ``slices`` with pyarrow and writes
    the ``preprocessed`` rows into Parquet files of that table's folder (one
    row group per input row group), invisible until the driver commits them;
    only the files' names and statistics go back through Spark.
    """
    schema = tables.arrow_schema(tables.PREPROCESSED)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cv2.setNumThreads(1)
        chain = PreprocessChain.from_config(steps)
        writer = datafiles.FileWriter(folder, schema, datafiles.PIXEL_CODEC)
        for batch in batches:
            for task in batch.to_pylist():
                rows = datafiles.task_rows(task, INPUT_COLUMNS, _KEY)
                if rows.num_rows:
                    writer.write(processed_rows(chain, rows, stamp))
        yield datafiles.written_batch(writer.close())

    return run


def run(spark: SparkSession, settings: Settings) -> dict:
    """Run the configured chain over every slice it has not processed yet; summary with the table's figures."""
    warehouse, chain = settings.warehouse, settings.preprocess.chain()
    chain_hash = chain.config_hash()
    total = tables.row_count(spark, warehouse, tables.SLICES)
    direct = (datafiles.direct(spark, settings.table_writer, warehouse)
              and tables.whole_files(spark, warehouse, tables.SLICES)
              and tables.whole_files(spark, warehouse, tables.PREPROCESSED))
    processed = (_run_direct if direct else _run_with_spark)(spark, settings, chain, total)
    summary = {"chain_hash": chain_hash, "steps": [s["step"] for s in chain.steps],
               "slices_total": total, "slices_processed": processed}
    pre = tables.scan(spark, warehouse, tables.PREPROCESSED, _KEY + ["error", "mask_valid", "lung_fraction"],
                      {"chain_hash": [chain_hash]})
    valid = pre.filter(pc.fill_null(pre.column("mask_valid"), False))
    summary.update({"table_rows": pre.num_rows, "errors": pre.num_rows - pre.column("error").null_count,
                    "valid_lung_masks": valid.num_rows,
                    "mean_lung_fraction": round(pc.mean(pre.column("lung_fraction")).as_py() or 0.0, 4)})
    picture = write_montage(spark, settings, chain, valid)
    if picture:
        summary["montage"] = picture
    return summary


def _run_with_spark(spark: SparkSession, settings: Settings, chain: PreprocessChain, total: int) -> int:
    """Spark's reader and Delta MERGE, for warehouses the workers cannot read and write directly; slices processed."""
    warehouse, chain_hash = settings.warehouse, chain.config_hash()
    done = (tables.read(spark, warehouse, tables.PREPROCESSED)
            .filter(F.col("chain_hash") == chain_hash).select(*_KEY))
    todo = tables.read(spark, warehouse, tables.SLICES).join(F.broadcast(done), _KEY, "left_anti")
    # Count keys only: caching the pixels just to count them cost more than processing them.
    pending = todo.select(*_KEY).count()
    log.info("%d of %d slices need chain %s", pending, total, chain_hash)
    if pending:
        # Slices travel to Python in Arrow batches bounded by bytes, not by a row count.
        with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                                  settings.preprocess.arrow_max_bytes_per_batch}), \
                StageProgress(spark.sparkContext, "preprocess", settings.preprocess.progress_seconds):
            tables.merge_upsert(spark, warehouse, tables.PREPROCESSED, todo.transform(lambda df: transform(df, chain)),
                                _KEY)
    return pending


def _run_direct(spark: SparkSession, settings: Settings, chain: PreprocessChain, total: int) -> int:
    """One pass: workers read the pending slices' row groups and write ``preprocessed`` files; one commit.

    Pending slices are found from the key columns alone (the driver reads
    them with delta-rs), never by joining pixel rows.  The commit adds the new
    files and removes the files holding the rows they replace (an older
    chain's); a file that also holds rows not replaced is written again
    without them.  Made at the version the check read; when another writer
    committed first, keys it processed under this chain are dropped from
    this run's files and the check is made again.
    """
    warehouse, chain_hash = settings.warehouse, chain.config_hash()
    version = datafiles.ensure_table(spark, warehouse, tables.PREPROCESSED)
    pending, existing = _pending(spark, warehouse, chain_hash, version)
    log.info("%d of %d slices need chain %s", pending.num_rows, total, chain_hash)
    if pending.num_rows == 0:
        return 0
    written = _write_files(spark, settings, chain, pending)
    return datafiles.commit_replacing(spark, warehouse, tables.PREPROCESSED, written,
                                      set(datafiles.key_strings(pending, _KEY).to_pylist()), _KEY,
                                      ("chain_hash", chain_hash), version, existing,
                                      {"stage": "preprocess", "chain": chain_hash})


def _existing(spark: SparkSession, warehouse: str, version: int) -> pa.Table:
    """Keys, chain and data file of every ``preprocessed`` row at ``version``."""
    return tables.locate(spark, warehouse, tables.PREPROCESSED, _KEY + ["chain_hash"], version)


def _pending(spark: SparkSession, warehouse: str, chain_hash: str, version: int) -> tuple[pa.Table, pa.Table]:
    """Located keys of the slices with no row under this chain, and the ``preprocessed`` rows at ``version``."""
    slices = tables.locate(spark, warehouse, tables.SLICES, _KEY)
    existing = _existing(spark, warehouse, version)
    done = datafiles.current_keys(existing, _KEY, "chain_hash", chain_hash)
    return slices.filter(pc.invert(pc.is_in(datafiles.key_strings(slices, _KEY), value_set=done))), existing


def _write_files(spark: SparkSession, settings: Settings, chain: PreprocessChain,
                 pending: pa.Table) -> list[datafiles.WrittenFile]:
    """The Spark job: a task per group of ``slices`` row groups, each writing one uncommitted file."""
    warehouse = settings.warehouse
    source = datafiles.row_group_tasks(spark, pending, tables.local_folder(spark, warehouse, tables.SLICES), _KEY)
    body = write_partition(chain.steps, tables.local_folder(spark, warehouse, tables.PREPROCESSED), run_stamp(chain))
    with StageProgress(spark.sparkContext, "preprocess", settings.preprocess.progress_seconds):
        return datafiles.collected(source.mapInArrow(body, datafiles.WRITTEN_SCHEMA).collect())


def write_montage(spark: SparkSession, settings: Settings, chain: PreprocessChain, valid: pa.Table) -> str | None:
    """PNG of the slice with the most lung (of the ``valid`` mask rows) through every stage of the chain.

    One slice is brought to the driver and run through the same pure chain,
    so the picture shows exactly what the executors computed.
    """
    if valid.num_rows == 0:
        return None
    best = valid.sort_by([("lung_fraction", "descending"), ("sop_uid", "ascending"), ("frame", "ascending")]).slice(0, 1)
    row = tables.lookup(spark, settings.warehouse, tables.SLICES,
                        {"sop_uid": best.column("sop_uid").to_pylist(), "frame": best.column("frame").to_pylist()},
                        ["pixels", "pixel_shape"])
    result = chain.apply(hu_frame(row.column("pixels")[0].as_py(), row.column("pixel_shape")[0].as_py()))
    path = tables.report_file(settings.report.folder, tables.MONTAGE_PNG)
    cv2.imwrite(str(path), montage(result["stages"], result["mask"]))
    return str(path)

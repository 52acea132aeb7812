"""Scheduled, incremental ingestion: Structured Streaming over a queue of new files, ``availableNow``.

The open-source counterpart of Auto Loader, built from parts batch ingestion
already trusts.  A scheduled run (cron, Airflow) does:

1. **discover** on the driver with the batch listing (``list_files`` or a
   manifest: hidden and empty files, Hadoop URIs and walk accounting exactly
   as in batch), drop the files the tables already hold and those ever queued
   (by source id), and append the rest to the Delta table ``ingest_queue`` in
   the restricted warehouse, one commit per ``ingest.stream_max_files`` files;
2. **stream** the queue with Delta's own streaming source from the query's
   checkpoint, ``maxFilesPerTrigger=1`` (one queued commit per micro-batch)
   and ``trigger(availableNow=True)``: every file queued before the query
   started, then stop;
3. **ingest** each micro-batch in ``foreachBatch`` with the batch path itself
   (``ingest._ingest`` on the micro-batch's files), so quarantine reasons,
   duplicates, de-identification, the direct writer and its commit races are
   the batch ones.

Exactly once: a micro-batch whose offsets were logged but whose commit was
not (a killed driver) is replayed by Spark from the checkpoint with the same
rows, and ingestion is idempotent by source id.  A queued file that no table
took (deleted or rewritten between discovery and reading: ``unaccounted``) is
queued again at once, for the next run.

Why a Delta table and Delta's source rather than a Python data source: a Python
stream reader runs its planning on the driver with the executors' interpreter
(``spark.executor_python``), which for a shipped archive (``./environment``)
exists only on the executors; the queue and its checkpoint also live on any
storage Spark reaches (local, NFS, HDFS, S3), as the tables do.  The queue
names paths, so it and the checkpoint are restricted data: they live with the
source map, outside the warehouse, and only their folders enter a plan.
"""
from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ctlake.errors import ConfigError, InputError
from ctlake.spark import tables

QUEUE = tables.INGEST_QUEUE
_LOCK_FILE = "ctlake-ingest.lock"


def checkpoint_location(checkpoint: str | None, restricted_warehouse: str | None) -> str:
    """The query checkpoint: ``ingest.checkpoint``, else ``<restricted warehouse>/checkpoints/ingest``."""
    if not restricted_warehouse:
        raise ConfigError("streaming ingest needs privacy.restricted_warehouse: its queue names paths, so it "
                          "lives there beside the source map")
    return checkpoint or f"{restricted_warehouse.rstrip('/')}/checkpoints/ingest"


def queued_ids(spark: SparkSession, restricted: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` any run has queued (processed or not)."""
    rows = tables.scan(spark, restricted, QUEUE, ["source_id"], where={"source_id": ids}, distinct=True)
    return set(rows.column(0).to_pylist())


def enqueue(spark: SparkSession, restricted: str, files: list[tuple[str, str, int]], run_id: str,
            per_batch: int) -> int:
    """Append ``(source_id, path, size)`` rows in their order, one commit (and one file) per micro-batch.

    ``per_batch`` 0 puts them all in one.  Returns how many were queued.
    """
    tables.create_if_missing(spark, restricted, QUEUE)
    if not files:
        return 0
    # Entries are numbered 1, 2, ... without gaps (one run at a time per queue): the next is the row count + 1,
    # read from the log's file statistics rather than by scanning the column.
    entry = tables.row_count(spark, restricted, QUEUE) + 1
    now = datetime.now(UTC)
    size = per_batch or len(files)
    for start in range(0, len(files), size):
        rows = [(entry + start + i, *file, run_id, now) for i, file in enumerate(files[start:start + size])]
        (spark.createDataFrame(rows, tables.INGEST_QUEUE_SCHEMA).coalesce(1)
         .write.format("delta").mode("append").save(tables.table_path(restricted, QUEUE)))
    return len(files)


@contextmanager
def checkpoint_lock(spark: SparkSession, checkpoint: str) -> Iterator[None]:
    """One scheduled run per checkpoint at a time: a second is refused at once, with one clear line.

    Spark detects two queries on one checkpoint only inside one session; two
    cron runs are two drivers.  Where the checkpoint is not a mounted folder
    (HDFS, S3) the scheduler must keep runs apart (``flock``, Airflow's
    ``max_active_runs=1``).
    """
    local = tables.local_path(spark, checkpoint)
    if local is None:
        yield
        return
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / _LOCK_FILE).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another streaming ingest holds the checkpoint {checkpoint}: "
                             "one run at a time per checkpoint (the next scheduled run takes over)") from None
        yield


def stream_queue(spark: SparkSession, restricted: str, checkpoint: str,
                 each_batch: Callable[[list, int], None]) -> None:
    """Run the ``availableNow`` query over the queue; ``each_batch(rows, batch_id)`` ingests one micro-batch.

    Rows are (entry, source_id, source_path, source_size) in entry order.
    Returns when every file queued before the start is processed; a
    micro-batch's failure is raised here whole (the query stops at it, and
    the next run replays it).
    """
    tables.create_if_missing(spark, restricted, QUEUE)
    frame = (spark.readStream.format("delta").option("maxFilesPerTrigger", 1)
             .load(tables.table_path(restricted, QUEUE)))
    failures = []

    def batch(micro_batch, batch_id: int) -> None:
        try:
            rows = micro_batch.select("entry", "source_id", "source_path", "source_size").orderBy(F.col("entry"))
            each_batch(rows.collect(), batch_id)
        except BaseException as exc:  # kept whole: Spark would hand back only its text
            failures.append(exc)
            raise

    query = (frame.writeStream.foreachBatch(batch).trigger(availableNow=True)
             .option("checkpointLocation", checkpoint).queryName("ctlake-ingest-stream").start())
    try:
        query.awaitTermination()
    except Exception:
        if failures:
            raise failures[0] from None
        raise

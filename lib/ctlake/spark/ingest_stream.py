"""Scheduled, incremental ingestion: Structured Streaming over new files, ``availableNow``, checkpointed.

The open-source counterpart of Auto Loader, built from the parts batch
ingestion already trusts.  A scheduled run (cron, Airflow) does:

1. **discover** on the driver with the batch listing (``list_files`` or a
   manifest: hidden and empty files, Hadoop URIs and walk accounting exactly
   as in batch), drop the files the tables already hold (by source id) and
   those already queued, and append the rest to the checkpoint's **file
   log**: numbered, append-only, written atomically;
2. **stream** the log from the offset of the last run's checkpoint with the
   ``ctlake_new_files`` source and ``trigger(availableNow=True)``: the query
   processes every entry logged up to its start, in micro-batches of at most
   ``ingest.stream_max_files`` files, then stops;
3. **ingest** each micro-batch in ``foreachBatch`` with the batch path
   itself (``ingest._ingest`` on the batch's files), so quarantine reasons,
   duplicates, de-identification, the direct writer and its commit races are
   the batch ones.

Exactly once: a micro-batch whose offsets were logged but whose commit was not
(a killed driver) is replayed by Spark with the same files, and ingestion is
idempotent by source id; the log's ``processed`` mark is advanced only after a
batch's tables are committed.  A file the log held but no table took (deleted
or rewritten between discovery and reading: ``unaccounted``) is queued again
by the next run, as batch lists it again.

The log names paths, so the checkpoint is restricted data: by default it
lives in ``privacy.restricted_warehouse`` beside the source map.  Only its
folder crosses into Spark's plan; the paths travel in task data, which no
event log records.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadLimit, ReadMaxFiles, SupportsTriggerAvailableNow

from ctlake.errors import ConfigError, InputError

#: The source's name, as ``spark.readStream.format`` takes it.
SOURCE_NAME = "ctlake_new_files"
#: The checkpoint's parts: ctlake's file log and lock, and Spark's own query checkpoint.
LOG_FOLDER, QUERY_FOLDER, LOCK_FILE = "files", "query", "lock"
_PROCESSED = "processed"


class FileLog:
    """The numbered, append-only log of discovered files; entry ``n`` (from 1) is the ``n``-th file logged.

    Each append is one file ``entries-<first>.jsonl`` written to a temporary
    name, fsynced and renamed: a reader sees a whole append or none.  Offsets of
    the stream are entry counts, so a replayed range names the same files.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _chunks(self) -> list[Path]:
        return sorted(self.folder.glob("entries-*.jsonl")) if self.folder.is_dir() else []

    def entries(self) -> list[tuple[str, int]]:
        """Every logged (path, length), in log order."""
        found = []
        for chunk in self._chunks():
            found += [tuple(json.loads(line)) for line in chunk.read_text().splitlines() if line]
        return found

    def count(self) -> int:
        return len(self.entries())

    def append(self, files: list[tuple[str, int]]) -> int:
        """Log ``files`` after the present entries; the new entry count."""
        first = self.count() + 1
        if files:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.folder / f"entries-{first:012d}.jsonl",
                              "".join(json.dumps([path, length]) + "\n" for path, length in files))
        return first - 1 + len(files)

    def processed(self) -> int:
        """Entries whose micro-batch committed its tables (the rest are pending: Spark replays them)."""
        mark = self.folder / _PROCESSED
        return int(mark.read_text()) if mark.is_file() else 0

    def mark_processed(self, entry: int) -> None:
        if entry > self.processed():
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.folder / _PROCESSED, str(entry))


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with part.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)


class NewFilesSource(DataSource):
    """``spark.readStream.format("ctlake_new_files").option("log", folder)``: the file log as a stream.

    Rows are (entry, path, length), metadata only: the files are read and
    parsed by the micro-batch's ingestion, on the executors.
    """

    @classmethod
    def name(cls) -> str:
        return SOURCE_NAME

    def schema(self) -> str:
        return "entry bigint, path string, length bigint"

    def streamReader(self, schema) -> DataSourceStreamReader:
        return _NewFilesReader(self.options)


class _NewFilesReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Offsets are ``{"entries": n}``: every file of the log up to entry ``n``."""

    def __init__(self, options):
        self.log = FileLog(options["log"])
        self.max_files = int(options.get("max_files", "0"))
        self.target: int | None = None

    def initialOffset(self) -> dict:
        return {"entries": 0}

    def prepareForTriggerAvailableNow(self) -> None:
        # What was logged when the query started: files logged later wait for the next run.
        self.target = self.log.count()

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxFiles(self.max_files) if self.max_files else ReadAllAvailable()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        available = self.log.count() if self.target is None else self.target
        end = available
        if isinstance(limit, ReadMaxFiles):
            end = min(available, start["entries"] + limit.max_files)
        return {"entries": max(end, start["entries"])}

    def partitions(self, start: dict, end: dict) -> list[InputPartition]:
        first, last = start["entries"], end["entries"]
        if last <= first:
            return []
        return [InputPartition((first, self.log.entries()[first:last]))]

    def read(self, partition: InputPartition) -> Iterator[tuple]:
        first, entries = partition.value
        for number, (path, length) in enumerate(entries, start=first + 1):
            yield number, path, length


@contextmanager
def checkpoint_lock(checkpoint: Path) -> Iterator[None]:
    """One scheduled run per checkpoint at a time: a second one is refused at once, with one clear line.

    Spark detects two queries on one checkpoint only inside one session; two
    cron runs are two drivers.
    """
    checkpoint.mkdir(parents=True, exist_ok=True)
    with (checkpoint / LOCK_FILE).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another streaming ingest holds the checkpoint {checkpoint}: "
                             "one run at a time per checkpoint (the next scheduled run takes over)") from None
        yield


def checkpoint_folder(checkpoint: str | None, restricted_warehouse: str | None) -> Path:
    """The stream's checkpoint: ``ingest.checkpoint``, else ``<restricted warehouse>/checkpoints/ingest``."""
    if checkpoint:
        chosen = checkpoint
    elif restricted_warehouse:
        chosen = f"{restricted_warehouse.rstrip('/')}/checkpoints/ingest"
    else:
        raise ConfigError("streaming ingest needs a checkpoint: set ingest.checkpoint or "
                          "privacy.restricted_warehouse (its file log names paths, so it is restricted data)")
    if "://" in chosen and not chosen.startswith("file:"):
        raise ConfigError(f"ingest.checkpoint must be a folder the driver mounts (local, NFS), found {chosen}")
    return Path(chosen.removeprefix("file:")).resolve()


def stream_batches(spark: SparkSession, log: FileLog, query_folder: Path, max_files: int,
                   each_batch) -> None:
    """Run the ``availableNow`` query over ``log``; ``each_batch(rows, batch_id)`` ingests one micro-batch.

    Returns when every entry logged before the start is processed; the
    micro-batch's failure is raised here (the query stops at it, and the next
    run replays it).
    """
    spark.dataSource.register(NewFilesSource)
    frame = (spark.readStream.format(SOURCE_NAME).option("log", str(log.folder))
             .option("max_files", str(max_files)).load())
    failures = []

    def batch(micro_batch, batch_id: int) -> None:
        try:
            each_batch(micro_batch.orderBy("entry").collect(), batch_id)
        except BaseException as exc:  # kept whole: Spark would hand back only its text
            failures.append(exc)
            raise

    query = (frame.writeStream.foreachBatch(batch).trigger(availableNow=True)
             .option("checkpointLocation", str(query_folder)).queryName("ctlake-ingest-stream").start())
    try:
        query.awaitTermination()
    except Exception:
        if failures:
            raise failures[0] from None
        raise

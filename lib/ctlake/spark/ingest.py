"""Ingestion: DICOM files -> de-identified ``slices``, ``series`` and ``quarantine`` Delta tables.

The run is incremental and idempotent by construction:

1. list the input (metadata only, no bytes read; local folders with ``os.scandir``);
2. name each file by its source id (a keyed hash of its path: paths name patients) and
   drop every id already recorded in ``slices`` or ``quarantine``; record the new ids'
   paths in the restricted ``source_map``, outside the warehouse, if one is configured;
3. read and parse only the new files on the executors, once: the parsed rows are
   persisted (memory, spilling to local disk) while the driver collects the
   small part of each row that decides where the file goes;
4. a file whose SOP instance is already ingested (or claimed by another new
   file) goes to ``quarantine`` as a ``duplicate``; the rest are MERGEd from
   the persisted rows into ``slices`` keyed on (sop_uid, frame); rejections
   are MERGEd into ``quarantine`` keyed on source id (no write when there
   are none, so a re-run commits nothing);
5. ``series`` rows are recomputed for the series that gained slices.

A crash between steps leaves a state from which the next run converges.
"""
from __future__ import annotations

import logging
import os
import re
import resource
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ctlake.config import IngestSettings, Settings
from ctlake.core.deid import DEV_KEY, Pseudonymizer, UidReplacer, key_fingerprint, source_id
from ctlake.core.dicom_parse import ParsePolicy, Rejection, parse_dicom, read_file
from ctlake.core.series_layout import series_row
from ctlake.errors import ConcurrentWriteError, ConfigError, InputError, error_cause
from ctlake.spark import datafiles, faults, ingest_stream, tables
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.ingest")

#: Spark's binaryFile source cannot hold a file of 2 GiB or more in one row.
MAX_FILE_BYTES = 2**31 - 1 - 1024


class Source(NamedTuple):
    """What a run reads: folders, globs or URIs to list (``inputs``), or a ``manifest`` naming the files."""

    inputs: tuple[str, ...] = ()
    manifest: str | None = None

    def named(self) -> tuple[str, ...]:
        """The paths the run was given, as the summary and the key check name them."""
        return (self.manifest,) if self.manifest else self.inputs


def source(settings: Settings, inputs: list[str] | tuple[str, ...] | None = None,
           manifest: str | None = None) -> Source:
    """The run's source: the command line's ``--input`` or ``--manifest``, else the configuration's."""
    if inputs and manifest:
        raise ConfigError("give --input or --manifest, not both")
    if inputs or manifest:
        return Source(tuple(inputs or ()), manifest)
    if settings.ingest.input and settings.ingest.manifest:
        raise ConfigError("set ingest.input or ingest.manifest, not both")
    return Source(settings.ingest.input or (), settings.ingest.manifest)


def validate(settings: Settings, inputs: list[str] | tuple[str, ...] | None = None,
             manifest: str | None = None, mode: str = "batch") -> Source:
    """Check everything ingestion needs before any Spark work: fail in milliseconds, not minutes."""
    if mode not in MODES:
        raise ConfigError(f"ingest mode must be one of {', '.join(MODES)}, found {mode!r}")
    chosen = source(settings, inputs, manifest)
    if not chosen.named():
        raise ConfigError("no input: pass --input PATH or --manifest FILE, or set ingest.input or ingest.manifest")
    settings.privacy.key(chosen.named())
    if mode == "stream":
        ingest_stream.checkpoint_location(settings.ingest.checkpoint, settings.privacy.restricted_warehouse)
    return chosen


#: Characters that make a Hadoop path a glob pattern.
_GLOB_CHARS = re.compile(r"[*?\[\]{}\\]")
class ListedFile(NamedTuple):
    """One input file as listed: ``path`` in the form of ``binaryFile``'s ``path`` column (``file:/abs``).

    The path lives in the driver's memory only (and in the restricted source
    map): the tables name the file by :func:`ctlake.core.deid.source_id`.
    Its modification time is not kept: it is the time a scan arrived, a date
    PS3.15 removes, and incrementality keys on the id.
    """

    path: str
    length: int


class Listing(NamedTuple):
    """The files to account for, and the entries of the walk that are not files to read, by kind.

    ``skipped`` kinds: ``symlink_loop`` (a folder reached again, through a link
    to itself or to an ancestor), ``same_file`` (a file reached again through
    another link: ingested once), ``unreadable_folder`` (listing it failed),
    ``unreadable_file`` (this process may not read it) and ``broken_link`` (a
    link to nothing, or a link chain that loops), ``overlapping_input`` (an input
    inside another input) and ``missing_file`` (a manifest names a file that
    does not exist).  None of them is recorded in
    a table: each is counted again on every run until it is fixed, and then
    ingested, which a quarantine row (never retried) would prevent.  A file
    binaryFile could not read would fail the whole run.
    """

    files: list[ListedFile]
    skipped: dict[str, int]


def list_files(spark: SparkSession, inputs: tuple[str, ...] | list[str] | str) -> Listing:
    """Every file under the inputs (folders, globs or Hadoop URIs), without reading contents, sorted by path.

    Not listed with ``binaryFile``: Spark's file sources silently drop empty
    files and names starting with ``.`` or ``_``, and every file must be
    accounted for, so those are listed here and quarantined with their reason.

    - A local folder or file (no scheme on a local default filesystem, or
      ``file:``) is walked with ``os.scandir`` in this process: it sees empty,
      hidden and ``_`` files, follows symbolic links like Hadoop's local
      filesystem, and costs no JVM round trip per file (Hadoop's ``listFiles``
      through py4j took 5 ms per file).  The walk enters each folder once (by
      device and inode), so a link loop ends it instead of failing the run, and
      an entry it cannot read is counted, not raised.
    - A glob, or any other scheme (``hdfs:``, ``s3a:``, ...), is expanded with
      Hadoop's ``globStatus`` (Hadoop glob syntax, ``{a,b}`` included); matched
      local folders are then walked in Python, other filesystems with
      Hadoop's recursive ``listFiles`` (one flat listing on object stores).
    - Several inputs (partitioned prefixes: a folder per day or per scanner)
      are listed one after the other into one listing; an input inside one
      listed before it adds nothing (``overlapping_input``), a file named by
      two globs is listed once.
    """
    walk = _LocalWalk()
    files: dict[str, ListedFile] = {}
    for input_path in sorted([inputs] if isinstance(inputs, str) else inputs):
        local = tables.local_path(spark, input_path)
        if local is not None and not _GLOB_CHARS.search(local):
            root = os.path.abspath(local)
            if not os.path.exists(root):
                raise InputError(f"input path not found: {input_path}")
            listed = walk.files(root, input_root=True)
        else:
            listed = _list_hadoop(spark, input_path, walk)
        for file in listed:
            files.setdefault(file.path, file)
    return Listing(sorted(files.values()), dict(sorted(walk.skipped.items())))


def read_manifest(spark: SparkSession, manifest: str) -> Listing:
    """The files a manifest names, one per line (``path``, or ``path,size`` as S3 Inventory reports give).

    At scale the listing is the bottleneck (20 million objects are about
    20,000 LIST calls on S3), and a producer often knows what it wrote: a
    manifest skips the listing.  Lines with a size cost nothing more; a line
    without one costs a ``stat`` (a HEAD request on object stores).  Blank
    lines and ``#`` comments are ignored; a named file that does not exist is
    counted (``missing_file``), like an unreadable entry of a walk, and
    ingested by a later run once it does.
    """
    local = tables.local_path(spark, manifest)
    try:
        if local is not None:
            with open(local, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        else:
            lines = spark.sparkContext.textFile(manifest, 1).collect()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the manifest {manifest}: {exc}") from exc
    skipped: Counter = Counter()
    files: dict[str, ListedFile] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, size = line.rpartition(",")
        if not (path and size.strip().isdigit()):
            path, size = line, ""
        listed = (_manifest_entry(spark, path.strip(), int(size)) if size else _stat(spark, path.strip()))
        if listed is None:
            skipped["missing_file"] += 1
        else:
            files.setdefault(listed.path, listed)
    if skipped:
        log.warning("%d files the manifest names do not exist", skipped["missing_file"])
    return Listing(sorted(files.values()), dict(skipped))


def _manifest_entry(spark: SparkSession, path: str, size: int) -> ListedFile:
    local = tables.local_path(spark, path)
    return ListedFile("file:" + os.path.abspath(local), size) if local is not None else ListedFile(path, size)


def _stat(spark: SparkSession, path: str) -> ListedFile | None:
    local = tables.local_path(spark, path)
    if local is not None:
        try:
            stat = os.stat(local)
        except OSError:
            return None
        return _local_listing(os.path.abspath(local), stat) if os.path.isfile(local) else None
    hadoop_path = spark._jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark._jsc.hadoopConfiguration())
    if not fs.exists(hadoop_path):
        return None
    status = fs.getFileStatus(hadoop_path)
    return _hadoop_listing(status) if status.isFile() else None


class _LocalWalk:
    """A walk of local folders that visits each folder and file once and counts what it skips."""

    def __init__(self):
        self.skipped: Counter = Counter()
        self._seen: set[tuple[int, int]] = set()

    def _first_visit(self, stat: os.stat_result) -> bool:
        key = (stat.st_dev, stat.st_ino)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def files(self, root: str, input_root: bool = False) -> Iterator[ListedFile]:
        stat = os.stat(root)
        if not os.path.isdir(root):
            if self._first_visit(stat):
                yield _local_listing(root, stat)
            return
        if not self._first_visit(stat) and input_root:
            self.skipped["overlapping_input"] += 1
            return
        folders = [root]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    listed = list(entries)
            except OSError:
                self.skipped["unreadable_folder"] += 1
                continue
            for entry in listed:
                try:
                    stat = entry.stat()  # follows links, like Hadoop's local filesystem
                except OSError:
                    self.skipped["broken_link"] += 1
                    continue
                if not self._first_visit(stat):
                    self.skipped["symlink_loop" if entry.is_dir() else "same_file"] += 1
                elif entry.is_dir():
                    folders.append(entry.path)
                elif not entry.is_file():
                    continue
                elif os.access(entry.path, os.R_OK):
                    yield _local_listing(entry.path, stat)
                else:
                    self.skipped["unreadable_file"] += 1


def _local_listing(path: str, stat: os.stat_result) -> ListedFile:
    return ListedFile("file:" + path, stat.st_size)


def _list_hadoop(spark: SparkSession, input_path: str, walk: _LocalWalk) -> Iterator[ListedFile]:
    jvm = spark._jvm
    pattern = jvm.org.apache.hadoop.fs.Path(input_path)
    fs = pattern.getFileSystem(spark._jsc.hadoopConfiguration())
    statuses = fs.globStatus(pattern)
    if not statuses:
        raise InputError(f"input path not found: {input_path}")
    local = fs.getScheme() == "file"
    for status in statuses:
        if local:
            yield from walk.files(status.getPath().toUri().getPath(), input_root=True)
        elif status.isFile():
            yield _hadoop_listing(status)
        else:
            files = fs.listFiles(status.getPath(), True)
            while files.hasNext():
                yield _hadoop_listing(files.next())


def _hadoop_listing(status) -> ListedFile:
    return ListedFile(status.getPath().toString(), int(status.getLen()))


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


def cap_address_space(limit: int) -> None:
    """Lower this process's address-space limit to ``limit`` bytes (never raise it).

    Called in the Python worker before it parses files: a decoder asking for
    more then gets MemoryError, which quarantines the one file, where the
    operating system or YARN would kill the worker or the whole container.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _parsed_files(batches: Iterator[pa.RecordBatch], key: bytes, policy: ParsePolicy,
                  replace_uids: bool) -> Iterator[tuple[dict, list[dict] | Rejection]]:
    """(source columns, parse result) of each file of a task's input batches.

    Input rows are either listing rows (``source_id``, ``path``, ``length`` of
    local files, which the worker reads itself) or ``binaryFile`` rows (``path``,
    ``length``, ``content``).
    """
    pseudonymize, uids = Pseudonymizer(key), (UidReplacer(key) if replace_uids else None)
    for batch in batches:
        for identifier, length, content in _contents(batch, key):
            yield ({"source_id": identifier, "source_size": int(length)},
                   parse_dicom(content, pseudonymize, policy, uids))


def _rejection_fields(result: Rejection) -> dict:
    return {"reason": result.reason, "message": result.message, "sop_uid": result.sop_uid,
            "series_uid": result.series_uid, "modality": result.modality, "transfer_syntax": result.transfer_syntax}


def parse_partition(key: bytes, max_batch_bytes: int, policy: ParsePolicy, replace_uids: bool,
                    address_space: int):
    """The mapInArrow body of Spark's writer: parse each file, emit frame rows or one rejection row per file.

    Output batches are cut by bytes of pixel data, so a partition of large
    512x512 multi-frame files never builds one huge Arrow batch.
    """
    schema = to_arrow_schema(tables.PARSED_SCHEMA, timezone="UTC")

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cap_address_space(address_space)
        out, size = [], 0
        for source, result in _parsed_files(batches, key, policy, replace_uids):
            if isinstance(result, Rejection):
                out.append({**source, **_rejection_fields(result)})
            else:
                for record in result:
                    out.append({**record, **source})
                    size += len(record["pixels"])
            if size >= max_batch_bytes:
                yield pa.RecordBatch.from_pylist(out, schema=schema)
                out, size = [], 0
        if out:
            yield pa.RecordBatch.from_pylist(out, schema=schema)

    return run


#: What a task of the direct writer returns: a row per accepted frame (with the uncommitted data file
#: that holds it) or rejected file, and a row per data file it wrote (``source_id`` null).
WRITE_OUTCOME_SCHEMA = T.StructType([
    *tables.SOURCE_FIELDS,
    T.StructField("frame", T.IntegerType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("modality", T.StringType()),
    T.StructField("transfer_syntax", T.StringType()),
    T.StructField("reason", T.StringType()),
    T.StructField("message", T.StringType()),
    T.StructField("data_file", T.StringType()),
    T.StructField("file_size", T.LongType()),
    T.StructField("file_rows", T.LongType()),
    T.StructField("file_stats", T.StringType()),
])


def write_partition(key: bytes, max_batch_bytes: int, policy: ParsePolicy, replace_uids: bool,
                    address_space: int, folder: str, stamp: dict):
    """The mapInArrow body of the direct writer: parse each file and write its frames into ``slices`` files.

    The frames (with ``stamp``: run id, ingest time, key fingerprint) go into
    Parquet files of the ``slices`` folder in row groups cut by bytes of pixel
    data; they stay invisible until the driver commits them.  Only the small
    outcome rows (``WRITE_OUTCOME_SCHEMA``) go back through Spark.
    """
    schema = tables.arrow_schema(tables.SLICES)
    outcome_schema = to_arrow_schema(WRITE_OUTCOME_SCHEMA)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cap_address_space(address_space)
        writer = datafiles.FileWriter(folder, schema, datafiles.PIXEL_CODEC)
        outcomes, rows, unwritten, size = [], [], [], 0

        def flush():
            name = writer.write(pa.Table.from_pylist(rows, schema=schema))
            for outcome in unwritten:
                outcome["data_file"] = name

        for source, result in _parsed_files(batches, key, policy, replace_uids):
            if isinstance(result, Rejection):
                outcomes.append({**source, **_rejection_fields(result)})
                continue
            for record in result:
                rows.append({**record, **source, **stamp})
                size += len(record["pixels"])
                outcome = {**source, **{k: record[k] for k in _FRAME_OUTCOME}}
                unwritten.append(outcome)
                outcomes.append(outcome)
            if size >= max_batch_bytes:
                flush()
                rows, unwritten, size = [], [], 0
        if rows:
            flush()
        outcomes += [{"data_file": f.name, "file_size": f.size, "file_rows": f.rows, "file_stats": f.stats}
                     for f in writer.close()]
        yield pa.RecordBatch.from_pylist(outcomes, schema=outcome_schema)

    return run


_FRAME_OUTCOME = ("frame", "sop_uid", "series_uid", "modality", "transfer_syntax")


def _contents(batch: pa.RecordBatch, key: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(source id, size, bytes) of each file of a batch; a local file deleted since listing yields nothing."""
    columns = batch.schema.names
    if "content" in columns:
        for path, length, content in zip(*(batch.column(c).to_pylist() for c in ("path", "length", "content"))):
            yield source_id(key, path), length, content
        return
    for identifier, path, length in zip(*(batch.column(c).to_pylist() for c in ("source_id", "path", "length"))):
        try:
            content = read_file(path)
            size = os.stat(path).st_size
        except OSError:
            continue  # gone (or unreadable) since it was listed: counted as unaccounted, listed again next run
        if size != length:
            # Rewritten since it was listed (a copy still arriving, or replaced): parsing these bytes could
            # quarantine a file that is whole a moment later.  Unaccounted now, listed again next run.
            continue
        yield identifier, length, content


#: How parsed rows are kept between parsing and writing: on the executors' local disks (no
#: compression, no Parquet encoding), not in the heap the writers need.  MEMORY_AND_DISK measured
#: 15-30% slower end to end on 2 cores with a 4 GB driver.  A cache block that is lost (executor
#: gone, disk cleared) is recomputed, i.e. its files are read and decoded again: slower, but the
#: same rows, because parsing is deterministic.
PARSED_STORAGE = StorageLevel.DISK_ONLY


#: Columns of the parsed rows the driver needs (one small row per frame or rejected file).
_OUTCOME_COLUMNS = ["source_id", "frame", "sop_uid", "series_uid", "modality", "transfer_syntax",
                    "reason", "message"]


#: How a run finds its files: ``batch`` lists the input and takes what the tables lack; ``stream`` also
#: queues them in the ``ingest_queue`` table and ingests it with Structured Streaming (``ingest_stream``).
MODES = ("batch", "stream")


def run(spark: SparkSession, settings: Settings, inputs: list[str] | tuple[str, ...] | str | None = None,
        mode: str = "batch", manifest: str | None = None) -> dict:
    """Ingest every new file under the inputs (or named by the manifest); return the run summary.

    The counts of the summary add up.  The run records itself in
    ``ingest_runs``: a ``running`` row first, then its outcome (``succeeded``
    with its counts, or ``failed`` with the cause), so a run killed on the way
    is still visible to operators.
    """
    chosen = validate(settings, [inputs] if isinstance(inputs, str) else inputs, manifest, mode)
    key = settings.privacy.key(chosen.named())
    record = {"run_id": tables.new_run_id(datetime.now(UTC)), "mode": mode, "status": "running",
              "started_at": datetime.now(UTC), "input_id": source_id(key, "\n".join(chosen.named())),
              "key_fingerprint": key_fingerprint(key)}
    warehouse = settings.warehouse
    before = {t: tables.version(spark, warehouse, t) for t in _RUN_TABLES}
    _record_run(spark, warehouse, record)
    # Spark's Delta writers name the run in each commit, as delta-rs commits do with ctlake.run.
    with session_conf(spark, {tables.USER_METADATA: record["run_id"]}):
        try:
            ingest_files = _stream if mode == "stream" else _batch
            summary = ingest_files(spark, settings, chosen, record["run_id"], key)
        except BaseException as exc:
            _record_run(spark, warehouse, {**record, "status": "failed", "ended_at": datetime.now(UTC),
                                           "error": error_cause(exc),
                                           "versions_written": _versions_written(spark, warehouse, record, before)})
            raise
    _record_run(spark, warehouse, {**record, **_run_counts(summary), "status": "succeeded",
                                   "ended_at": datetime.now(UTC),
                                   "versions_written": _versions_written(spark, warehouse, record, before)})
    return {"run_id": record["run_id"], "mode": mode, **summary}


#: The warehouse tables an ingestion run commits to (``ingest_runs`` itself aside).
_RUN_TABLES = (tables.SLICES, tables.QUARANTINE, tables.SERIES)


def _record_run(spark: SparkSession, warehouse: str, record: dict) -> None:
    row = pa.Table.from_pylist([record], schema=tables.arrow_schema(tables.INGEST_RUNS))
    tables.upsert(spark, warehouse, tables.INGEST_RUNS, row, ["run_id"], {"run": record["run_id"], "stage": "ingest"})


def _versions_written(spark: SparkSession, warehouse: str, record: dict, before: dict) -> dict:
    written = {t: tables.versions_by_run(spark, warehouse, t, record["run_id"], before[t]) for t in _RUN_TABLES}
    return {t: versions for t, versions in written.items() if versions}


def _run_counts(summary: dict) -> dict:
    """The ``ingest_runs`` columns a summary fills."""
    return {k: summary[k] for k in ("files_seen", "already_ingested", "new_files", "files_ingested",
                                    "ingested_elsewhere", "unaccounted", "slices_written", "series_updated",
                                    "quarantined", "walk_skipped")}


def _listing(spark: SparkSession, chosen: Source) -> Listing:
    return read_manifest(spark, chosen.manifest) if chosen.manifest else list_files(spark, chosen.inputs)


def _batch(spark: SparkSession, settings: Settings, chosen: Source, run_id: str, key: bytes) -> dict:
    """List the input and ingest what the tables lack: a one-off load, or a scheduled run without a checkpoint."""
    _warn_development_key(key)
    return _ingest(spark, settings, _listing(spark, chosen), ", ".join(chosen.named()), run_id, key)


def _warn_development_key(key: bytes) -> None:
    if key == DEV_KEY:
        log.warning("pseudonymizing with the public development key (%s): acceptable for the synthetic "
                    "sample cohort only", key_fingerprint(key))


def _stream(spark: SparkSession, settings: Settings, chosen: Source, run_id: str, key: bytes) -> dict:
    """Queue the files that arrived since the last run, then ingest the queue with Structured Streaming.

    The summary adds up the micro-batches' summaries; ``files_queued`` is
    what this run queued, ``batches`` how many micro-batches ingested the
    queue (those a killed run left included).
    """
    _warn_development_key(key)
    named = ", ".join(chosen.named())
    restricted = settings.privacy.restricted_warehouse
    checkpoint = ingest_stream.checkpoint_location(settings.ingest.checkpoint, restricted)
    with ingest_stream.checkpoint_lock(spark, checkpoint):
        check_key(spark, settings.warehouse, key_fingerprint(key))
        listing = _listing(spark, chosen)
        by_id = {source_id(key, f.path): f for f in listing.files}
        known = _ingested_ids(spark, settings.warehouse, list(by_id))
        queued = ingest_stream.queued_ids(spark, restricted, [i for i in by_id if i not in known])
        arrived = [(i, f.path, f.length) for i, f in by_id.items() if i not in known and i not in queued]
        ingest_stream.enqueue(spark, restricted, arrived, run_id, settings.ingest.stream_max_files)
        log.info("%d files under the input, %d already ingested, %d newly queued", len(listing.files), len(known),
                 len(arrived))
        batches = []

        def ingest_batch(rows: list, batch_id: int) -> None:
            if not rows:  # Delta's source reads a new queue's empty first version as a batch
                return
            files = {r["source_id"]: ListedFile(r["source_path"], r["source_size"]) for r in rows}
            log.info("micro-batch %d: %d queued files", batch_id, len(files))
            batches.append(_ingest(spark, settings, Listing(list(files.values()), {}), named, run_id, key))
            if not batches[-1]["unaccounted"]:
                return
            # Changed while read (in no table): queued again, for the next run.
            missed = set(files) - _ingested_ids(spark, settings.warehouse, list(files))
            ingest_stream.enqueue(spark, restricted, [(i, files[i].path, files[i].length) for i in sorted(missed)],
                                  run_id, settings.ingest.stream_max_files)

        ingest_stream.stream_queue(spark, restricted, checkpoint, ingest_batch)
        ran = len(batches)
        if not batches:  # nothing queued: still repair a stale series, as a batch run does
            batches.append(_ingest(spark, settings, Listing([], {}), named, run_id, key))
    summary = {**batches[-1], "input": named, "files_seen": len(listing.files), "already_ingested": len(known),
               "files_queued": len(arrived), "batches": ran, "walk_skipped": listing.skipped}
    for count in ("new_files", "files_ingested", "ingested_elsewhere", "unaccounted", "slices_written",
                  "series_updated"):
        summary[count] = sum(b[count] for b in batches)
    summary["quarantined"] = dict(sorted(sum((Counter(b["quarantined"]) for b in batches), Counter()).items()))
    if any("accounted_for" in b for b in batches):
        summary["accounted_for"] = all(b.get("accounted_for", True) for b in batches)
    if listing.skipped:
        log.warning("the walk skipped entries that are not files to read: %s", listing.skipped)
    summary.pop("warning", None)
    if not listing.files:
        summary["warning"] = f"no files under {named}"
    return summary


def _ingest(spark: SparkSession, settings: Settings, listing: Listing, named: str, run_id: str, key: bytes) -> dict:
    """Ingest the listed files the tables lack; ``named`` is how the summary names the input."""
    warehouse = settings.warehouse
    fingerprint = key_fingerprint(key)
    check_key(spark, warehouse, fingerprint)
    listing, skipped = listing
    by_id = {source_id(key, f.path): f for f in listing}
    known = _ingested_ids(spark, warehouse, list(by_id))
    new_files = {i: f for i, f in by_id.items() if i not in known}
    log.info("%d files under the input, %d not ingested yet", len(listing), len(new_files))
    if new_files and settings.privacy.restricted_warehouse:
        record_sources(spark, settings, new_files, run_id)

    summary = {"input": named, "files_seen": len(listing),
               "already_ingested": len(listing) - len(new_files), "new_files": len(new_files),
               "files_ingested": 0, "ingested_elsewhere": 0, "unaccounted": 0, "slices_written": 0,
               "series_updated": 0,
               "quarantined": {}, "walk_skipped": skipped, "key_fingerprint": fingerprint,
               "development_key": key == DEV_KEY}
    if skipped:
        log.warning("the walk skipped entries that are not files to read: %s", skipped)
    if not listing:
        summary["warning"] = f"no files under {named}"
    if new_files:
        with session_conf(spark, _read_conf(spark, settings.ingest)):
            outcome = _ingest_new(spark, settings, new_files, run_id, key, fingerprint)
        summary.update(outcome)
        accounted = summary["files_ingested"] + summary["ingested_elsewhere"] + sum(summary["quarantined"].values())
        summary["unaccounted"] = len(new_files) - accounted
        if accounted != len(new_files):
            # A file deleted between listing and reading is in neither table; say so rather than hide it.
            log.warning("%d new files but %d accounted for in this run", len(new_files), accounted)
    # Also without new files: a run killed between its slices commit and this repairs nothing else.
    faults.point("ingest.series_update")
    summary["series_updated"] = update_series(spark, warehouse, run_id)
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE):
        tables.create_if_missing(spark, warehouse, table)
    summary["table_totals"] = {t: tables.row_count(spark, warehouse, t)
                               for t in (tables.SLICES, tables.SERIES, tables.QUARANTINE)}
    if new_files:
        summary["accounted_for"] = accounted == len(new_files)
    return summary


def _read_conf(spark: SparkSession, ingest: IngestSettings) -> dict:
    """Session settings while new files are read, parsed and written."""
    return {
        "spark.sql.files.maxPartitionBytes": ingest.max_partition_bytes,
        # Input batches to Python carry whole files: bound them by bytes as well as rows.
        "spark.sql.execution.arrow.maxBytesPerBatch": ingest.arrow_max_bytes_per_batch,
        # binaryFile is loaded with one path per new file; past 32 paths Spark lists them in a job of
        # one task per path (up to 10000): 4-6 s of task overhead for 1024 files on 2 cores. Listing
        # stays distributed, with one task per core instead.
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": spark.sparkContext.defaultParallelism,
        "spark.sql.parquet.compression.codec": datafiles.PIXEL_CODEC,
    }


def check_key(spark: SparkSession, warehouse: str, fingerprint: str) -> None:
    """Refuse a key other than the one that made the warehouse's pseudonyms: it would split every patient."""
    used = tables.scan(spark, warehouse, tables.SLICES, ["key_fingerprint"], distinct=True).column(0).to_pylist()
    other = sorted(f for f in used if f != fingerprint)
    if other:
        raise InputError(f"the slices table was pseudonymized under key {other[0]} and this run's key is "
                         f"{fingerprint}: the same patient would get two pseudonyms. Use the key that made the "
                         "warehouse, or a new warehouse")


def record_sources(spark: SparkSession, settings: Settings, files: dict[str, ListedFile], run_id: str) -> None:
    """Source id -> path of this run's new files, in the restricted warehouse (keyed: re-runs add nothing)."""
    restricted = settings.privacy.restricted_warehouse
    rows = [(i, f.path, run_id, datetime.now(UTC)) for i, f in files.items()]
    if datafiles.direct(spark, settings.table_writer, restricted):
        datafiles.append_new(spark, restricted, tables.SOURCE_MAP, _arrow_rows(tables.SOURCE_MAP, rows), "source_id",
                             {"run": run_id, "stage": "ingest"})
    else:
        tables.merge_insert(spark, restricted, tables.SOURCE_MAP,
                            spark.createDataFrame(rows, tables.SOURCE_MAP_SCHEMA), ["source_id"])


def _arrow_rows(table: str, rows: list[tuple]) -> pa.Table:
    """Driver-side rows (tuples in the declared column order) as an Arrow table of ``table``'s schema."""
    schema = tables.arrow_schema(table)
    return pa.Table.from_pylist([dict(zip(schema.names, row)) for row in rows], schema=schema)


class _Routed(NamedTuple):
    quarantine_rows: list[tuple]
    accepted: set[str]
    frames: int
    #: New files another run ingested first (seen when this run's commit had to be checked again).
    ingested_elsewhere: set[str]


def _ingest_new(spark: SparkSession, settings: Settings, new_files: dict[str, ListedFile], run_id: str,
                key: bytes, fingerprint: str) -> dict:
    """Parse the new files (by source id) once, write the accepted frames to ``slices``, the rest to ``quarantine``."""
    warehouse = settings.warehouse
    readable, quarantine_rows = {}, []
    for identifier, listed in new_files.items():
        reason = _skip_reason(listed.path, listed.length)
        if reason is None:
            readable[identifier] = listed
        else:
            quarantine_rows.append(_quarantine_row(identifier, listed, *reason))
    direct = datafiles.direct(spark, settings.table_writer, warehouse)
    routed = _Routed([], set(), 0, set())
    if readable:
        write = _write_direct if direct else _write_with_spark
        routed = write(spark, settings, readable, run_id, key, fingerprint)
    quarantine_rows += routed.quarantine_rows
    if quarantine_rows:
        faults.point("ingest.quarantine_write")
        now = datetime.now(UTC)
        rows = [(*row, now, run_id, fingerprint) for row in quarantine_rows]
        if direct:
            datafiles.append_new(spark, warehouse, tables.QUARANTINE, _arrow_rows(tables.QUARANTINE, rows),
                                 "source_id", {"run": run_id, "stage": "ingest"})
        else:
            tables.merge_insert(spark, warehouse, tables.QUARANTINE,
                                spark.createDataFrame(rows, tables.QUARANTINE_SCHEMA), ["source_id"])
    # Counted from this run's own rows, not re-read from the tables.
    by_reason = Counter(row[2] for row in quarantine_rows)
    return {"files_ingested": len(routed.accepted), "slices_written": routed.frames,
            "quarantined": dict(sorted(by_reason.items())), "ingested_elsewhere": len(routed.ingested_elsewhere)}


def _write_direct(spark: SparkSession, settings: Settings, readable: dict[str, ListedFile], run_id: str,
                  key: bytes, fingerprint: str) -> _Routed:
    """One pass: the workers parse the files and write the frames' data files; the driver commits them once.

    The duplicate check is made against the ``slices`` version the commit
    is then made at; when another writer commits first, the check is made
    again against the newer version (frames it ingested first are dropped from
    this run's files, which are rewritten) and the commit retried.
    """
    warehouse, ingest = settings.warehouse, settings.ingest
    version = datafiles.ensure_table(spark, warehouse, tables.SLICES)
    stamp = {"ingested_at": datetime.now(UTC), "ingest_run": run_id, "key_fingerprint": fingerprint}
    body = write_partition(key, ingest.arrow_max_bytes_per_batch, ingest.policy(), settings.privacy.uids == "replace",
                           ingest.worker_address_space, tables.local_folder(spark, warehouse, tables.SLICES), stamp)
    faults.point("ingest.parse")
    with StageProgress(spark.sparkContext, "ingest: parsing and writing slices", ingest.progress_seconds):
        rows = [r.asDict() for r in
                _source(spark, readable, ingest.max_partition_bytes).mapInArrow(body, WRITE_OUTCOME_SCHEMA).collect()]
    written = {r["data_file"]: datafiles.WrittenFile(r["data_file"], r["file_size"], r["file_rows"], r["file_stats"])
               for r in rows if r["source_id"] is None}
    outcomes = [r for r in rows if r["source_id"] is not None]
    try:
        for _ in range(datafiles.COMMIT_ATTEMPTS):
            frames = [o for o in outcomes if o["reason"] is None]
            duplicates, elsewhere = _find_duplicates(spark, warehouse, frames, readable, version)
            routed = route_outcomes([o for o in outcomes if o["source_id"] not in elsewhere], duplicates, readable)
            written = _drop_sources(spark, warehouse, written, frames, set(duplicates) | elsewhere)
            faults.point("ingest.slices_commit")
            try:
                datafiles.commit(spark, warehouse, tables.SLICES, list(written.values()), version,
                                 {"run": run_id, "stage": "ingest"})
                return _Routed(*routed, elsewhere)
            except datafiles.ConcurrentCommit:
                version = tables.version(spark, warehouse, tables.SLICES)
        raise ConcurrentWriteError(f"slices: {datafiles.COMMIT_ATTEMPTS} commits lost to concurrent writers; run again")
    except BaseException:
        datafiles.discard(spark, warehouse, tables.SLICES, list(written.values()))
        raise


def _drop_sources(spark: SparkSession, warehouse: str, written: dict[str, datafiles.WrittenFile], frames: list,
                  dropped: set[str]) -> dict[str, datafiles.WrittenFile]:
    """This run's uncommitted ``slices`` files without the frames of ``dropped`` source ids (files rewritten)."""
    by_file: dict[str, set[str]] = {}
    for frame in frames:
        if frame["source_id"] in dropped and frame["data_file"] in written:
            by_file.setdefault(frame["data_file"], set()).add(frame["source_id"])
    kept = dict(written)
    for name, sources in by_file.items():
        rewritten = datafiles.rewrite_without(spark, warehouse, tables.SLICES, name, ["source_id"], sources,
                                              datafiles.PIXEL_CODEC)
        datafiles.discard(spark, warehouse, tables.SLICES, [kept.pop(name)])
        if rewritten is not None:
            kept[rewritten.name] = rewritten
            for frame in frames:
                if frame["data_file"] == name:
                    frame["data_file"] = rewritten.name
    return kept


def _write_with_spark(spark: SparkSession, settings: Settings, readable: dict[str, ListedFile], run_id: str,
                      key: bytes, fingerprint: str) -> _Routed:
    """Spark's writer, for a warehouse the workers cannot write directly (``hdfs:``, ``s3a:``, ...).

    The parsed rows are persisted while the driver collects the small part
    of each row that decides where the file goes, then MERGEd into ``slices``
    keyed on (sop_uid, frame), so a concurrent writer cannot add a frame twice.
    """
    warehouse, ingest = settings.warehouse, settings.ingest
    body = parse_partition(key, ingest.arrow_max_bytes_per_batch, ingest.policy(), settings.privacy.uids == "replace",
                           ingest.worker_address_space)
    parsed = _source(spark, readable, ingest.max_partition_bytes).mapInArrow(body, tables.PARSED_SCHEMA).persist(PARSED_STORAGE)
    try:
        with StageProgress(spark.sparkContext, "ingest: parsing DICOM", ingest.progress_seconds):
            outcomes = parsed.select(*_OUTCOME_COLUMNS).collect()
        duplicates, _ = _find_duplicates(spark, warehouse, [o for o in outcomes if o["reason"] is None], readable)
        routed = route_outcomes(outcomes, duplicates, readable)
        if routed[1]:
            with StageProgress(spark.sparkContext, "ingest: writing slices", ingest.progress_seconds):
                _write_slices(spark, warehouse, parsed, duplicates, run_id, fingerprint)
    finally:
        parsed.unpersist()
    return _Routed(*routed, set())


def _quarantine_row(identifier: str, listed: ListedFile, reason: str, message: str | None, sop_uid: str | None = None,
                    series_uid: str | None = None, modality: str | None = None,
                    transfer_syntax: str | None = None) -> tuple:
    """The columns of a ``quarantine`` row that come from the file (up to ``transfer_syntax``)."""
    return (identifier, listed.length, reason, message, sop_uid, series_uid, modality,
            transfer_syntax)


def route_outcomes(outcomes: list, duplicates: dict[str, str],
                   listed_by_id: dict[str, ListedFile]) -> tuple[list[tuple], set[str], int]:
    """Where each parsed file goes: (quarantine rows, accepted source ids, accepted frames).

    A rejected file and a duplicate file each give one quarantine row (a
    duplicate multi-frame file once, not once per frame); every other frame is
    accepted.
    """
    quarantine_rows, accepted, frames = [], set(), 0
    for o in outcomes:
        identifier = o["source_id"]
        if o["reason"] is None and identifier not in duplicates:
            accepted.add(identifier)
            frames += 1
        elif o["reason"] is not None or o["frame"] == 1:
            reason, message = ((o["reason"], o["message"]) if o["reason"] is not None
                               else ("duplicate", duplicates[identifier]))
            quarantine_rows.append(_quarantine_row(identifier, listed_by_id[identifier], reason, message, o["sop_uid"],
                                                   o["series_uid"], o["modality"], o["transfer_syntax"]))
    return quarantine_rows, accepted, frames


def _write_slices(spark: SparkSession, warehouse: str, parsed: DataFrame, duplicates: dict[str, str],
                  run_id: str, fingerprint: str) -> None:
    accepted = parsed.filter(F.col("reason").isNull())
    if duplicates:
        # At most one small row per file: broadcast it, so the pixels are not shuffled.
        duplicate_ids = spark.createDataFrame([(i,) for i in duplicates], "source_id string")
        accepted = accepted.join(F.broadcast(duplicate_ids), "source_id", "left_anti")
    slices_new = (accepted.withColumn("ingested_at", F.current_timestamp())
                  .withColumn("ingest_run", F.lit(run_id)).withColumn("key_fingerprint", F.lit(fingerprint)))
    tables.merge_insert(spark, warehouse, tables.SLICES, slices_new, ["sop_uid", "frame"])


def _ingested_ids(spark: SparkSession, warehouse: str, ids: list[str]) -> set[str]:
    """The listed source ids already recorded in ``slices`` or ``quarantine``.

    Only the ``source_id`` column is read (Parquet column pruning), and only
    ids of this listing reach the driver.
    """
    if not ids:
        return set()
    return {identifier for table in (tables.SLICES, tables.QUARANTINE) for identifier in
            tables.scan(spark, warehouse, table, ["source_id"], {"source_id": ids}, distinct=True).column(0).to_pylist()}


#: Listing rows the local reader takes: the path is data of the tasks, never part of a plan.
_LOCAL_FILES = "source_id string, path string, length long"


def _source(spark: SparkSession, files: dict[str, ListedFile], max_partition_bytes: int) -> DataFrame:
    """What the parsing tasks read: listing rows of local files, else ``binaryFile`` rows.

    Local files (the usual receiver's folder, on a shared filesystem for a
    cluster) are read by the Python workers themselves from listing rows: the
    paths stay data, where Spark's ``binaryFile`` source would write every one
    of them into the plan's metadata, which the event log keeps unredacted
    (``InMemoryFileIndex[file:/.../DOE_JANE/...]``); and the bytes skip the
    copy from the JVM.  Partitions hold about ``ingest.max_partition_bytes`` of
    files each, at least one per core.  Files on other filesystems (``hdfs:``,
    ``s3a:``) are read with ``binaryFile``, one escaped path per new file (a
    file deleted since it was listed is skipped and listed again next run).
    """
    if all(f.path.startswith("file:") for f in files.values()):
        total = sum(f.length for f in files.values())
        slices = min(len(files), max(spark.sparkContext.defaultParallelism, -(-total // max_partition_bytes)))
        rows = [(identifier, f.path[len("file:"):], f.length)
                for identifier, f in sorted(files.items(), key=lambda item: item[1].path)]
        return spark.createDataFrame(spark.sparkContext.parallelize(rows, slices), _LOCAL_FILES)
    return (spark.read.format("binaryFile").option("ignoreMissingFiles", "true")
            .load([_escape_glob(f.path) for f in files.values()]))


def _find_duplicates(spark: SparkSession, warehouse: str, frames: list, listed_by_id: dict[str, ListedFile],
                     version: int | None = None) -> tuple[dict[str, str], set[str]]:
    """``{source_id: quarantine message}`` of new files whose SOP instance is claimed, and the files ingested already.

    A file is the unit: it is a duplicate if its SOP instance is in ``slices``
    (at ``version``, else the latest) from another file, or another new file
    with the same instance sorts before it by path.  A new file whose own
    frames are in ``slices`` already was ingested by a concurrent run: it is
    returned in the second set.  Messages name files by source id, never by path.
    """
    sop_of = {f["source_id"]: f["sop_uid"] for f in frames}
    first_claim: dict[str, str] = {}
    for identifier in sorted(sop_of, key=lambda i: listed_by_id[i].path):
        first_claim.setdefault(sop_of[identifier], identifier)
    claimed_by = {}
    if first_claim:
        claimed = tables.scan(spark, warehouse, tables.SLICES, ["sop_uid", "source_id"],
                              {"sop_uid": list(first_claim), "frame": [1]}, version)
        claimed_by = dict(zip(claimed.column("sop_uid").to_pylist(), claimed.column("source_id").to_pylist()))
    duplicates, elsewhere = {}, set()
    for identifier, sop_uid in sop_of.items():
        in_run, existing = first_claim[sop_uid], claimed_by.get(sop_uid)
        if existing == identifier:
            elsewhere.add(identifier)
        elif in_run != identifier or existing is not None:
            holder = in_run if in_run != identifier else existing
            duplicates[identifier] = f"SOP instance {sop_uid} already ingested from source {holder}"
    return duplicates, elsewhere


def update_series(spark: SparkSession, warehouse: str, run_id: str) -> int:
    """Recompute the ``series`` rows that do not describe the ``slices`` table as it is now.

    A row is stale when its series has more or fewer slices than it counted,
    or a run added slices after the row was written: two small columns of
    ``slices`` say so, so every run checks (a run killed between its slices
    commit and this update is repaired by the next one, new files or not).
    Only the stale series' metadata rows (no pixels) are read, summarized on
    the driver and upserted.  The check is repeated after the upsert until it
    finds nothing: a concurrent run may commit slices of the same series after
    this run read them, with an ``ingested_at`` older than this row's
    ``updated_at``, which only the count reveals.  Whichever run writes last
    checks last, so the table ends up exact.
    """
    updated = set()
    for _ in range(datafiles.COMMIT_ATTEMPTS):
        stale = _stale_series(spark, warehouse)
        if not stale:
            return len(updated)
        metadata = tables.scan(spark, warehouse, tables.SLICES, _SERIES_INPUT, {"series_uid": stale}).to_pandas()
        # Six cosines as one string, so equal orientations compare equal.
        metadata["orientation"] = metadata.pop("image_orientation").map(
            lambda cosines: None if cosines is None else ",".join(map(str, cosines.tolist())))
        metadata = metadata.sort_values(["series_uid", "sop_uid", "frame"], kind="stable")
        now = datetime.now(UTC)
        summaries = [{**series_row(group), "updated_at": now} for _, group in metadata.groupby("series_uid", sort=True)]
        tables.upsert(spark, warehouse, tables.SERIES,
                      pa.Table.from_pylist(summaries, schema=tables.arrow_schema(tables.SERIES)), ["series_uid"],
                      {"run": run_id, "stage": "ingest"})
        updated.update(stale)
    raise ConcurrentWriteError(f"series: still stale after {datafiles.COMMIT_ATTEMPTS} updates; run again")


def _stale_series(spark: SparkSession, warehouse: str) -> list[str]:
    """Series whose ``series`` row is missing, counts other slices, or predates their newest slices."""
    stamps = tables.scan(spark, warehouse, tables.SLICES, ["series_uid", "ingested_at"]).group_by(
        "series_uid", use_threads=False).aggregate([("ingested_at", "max"), ("ingested_at", "count")]).to_pandas()
    if stamps.empty:
        return []
    stamps = stamps.set_index("series_uid")
    current = tables.scan(spark, warehouse, tables.SERIES, ["series_uid", "slice_count", "updated_at"]).to_pandas()
    current = current.set_index("series_uid").reindex(stamps.index)
    stale = (current["updated_at"].isna() | (current["updated_at"] < stamps["ingested_at_max"])
             | (current["slice_count"] != stamps["ingested_at_count"]))
    return stamps.index[stale].tolist()


#: The ``slices`` columns a ``series`` row is computed from.
_SERIES_INPUT = ["series_uid", "sop_uid", "frame", "study_uid", "patient_pseudonym", "modality", "manufacturer",
                 "z_position", "rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness",
                 "image_orientation"]

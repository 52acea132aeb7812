"""Storage: Parquet data files the Python workers write themselves, committed to Delta by the driver.

Why: a pixel row that goes back from the Python worker to the JVM costs more than the work that made
it.  Measured on 1024 CT slices of 512x512 (2 cores): ``mapInArrow`` -> Delta append moved 87 files/s
whether or not the worker parsed anything, while a worker that parses and writes its own Parquet
file moved 262-336 files/s, against 187-215 files/s for one single-process loop doing the same work
(the issue 11 probe; ``docs/speed.md``).  So image stages write their rows where they are made,
and only each file's name, size, row count and statistics come back to the driver.

What Delta guarantees is kept:

- **Atomic.**  A data file is invisible until the one commit that adds it to the log; a run killed
  before its commit leaves unreferenced files that ``VACUUM`` removes, never a half-visible run.
- **Schema.**  Files are written with the table's declared Arrow schema (``tables.SCHEMAS``), the
  table is created or evolved to it by Spark before any worker writes, and the commit names the
  table's own schema, so a commit never changes the table's metadata.
- **Concurrent writers.**  The commit is made at exactly the version the caller's checks read
  (delta-rs with no automatic retry): when another writer committed first, :class:`ConcurrentCommit`
  tells the caller to check its keys against the newer version and commit again.
- **Durable.**  Each data file (and its folder entry) is fsynced before it is reported, so a commit
  never names a file a crash could lose.

Only for a warehouse on a filesystem every worker and the driver mount (local disk, NFS, a shared
volume): ``tables.local_folder`` says whether a table is one; other warehouses keep Spark's writer.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ctlake.errors import ConcurrentWriteError, ConfigError
from ctlake.spark import tables

#: Roll over to a new data file past this many bytes of Arrow data (before compression): large enough
#: that a series is read from few files, small enough for one task's memory and Delta's file skipping.
MAX_FILE_BYTES = 512 * 2**20

#: Parquet codec of the image tables' data files (``slices``: int16 HU pixels, 512 KiB a slice).
#: Measured on 1024 CT slices: uncompressed 100% of the size, lz4_raw 87%, snappy 84%, zstd 62%;
#: writing them on 2 cores took 6.9 s, 10.8 s, 13.6 s and 15.7 s (zstd at Spark's level 3).
#: Not lz4_raw, though faster: Spark's LZ4 decoder (aircompressor) rejected pages of pyarrow-written
#: lz4_raw files of the 200-patient sample ("last 5 bytes must be literals"), so Spark could not
#: read a table ctlake had written.  snappy is what every Parquet reader reads.
PIXEL_CODEC = "snappy"


class WrittenFile(NamedTuple):
    """One data file a worker wrote: its name in the table folder, bytes, rows and Delta statistics (JSON)."""

    name: str
    size: int
    rows: int
    stats: str


#: What a writing task returns for each data file it wrote (one row per file, no data).
WRITTEN_SCHEMA = T.StructType([
    T.StructField("data_file", T.StringType()),
    T.StructField("file_size", T.LongType()),
    T.StructField("file_rows", T.LongType()),
    T.StructField("file_stats", T.StringType()),
])


def written_batch(files: list[WrittenFile]) -> pa.RecordBatch:
    """A writing task's files as one Arrow batch of :data:`WRITTEN_SCHEMA`."""
    return pa.RecordBatch.from_pylist([{"data_file": f.name, "file_size": f.size, "file_rows": f.rows,
                                        "file_stats": f.stats} for f in files],
                                      schema=to_arrow_schema(WRITTEN_SCHEMA))


def collected(rows: list) -> list[WrittenFile]:
    """The driver's :data:`WRITTEN_SCHEMA` rows back as files to commit."""
    return [WrittenFile(r["data_file"], r["file_size"], r["file_rows"], r["file_stats"]) for r in rows]


class ConcurrentCommit(Exception):
    """Another writer committed to the table after the version this commit was checked against."""


def direct(spark: SparkSession, writer: str, warehouse: str) -> bool:
    """Whether the workers write ``warehouse``'s tables themselves (``table_writer``: auto, direct or spark)."""
    if writer == "spark":
        return False
    local = tables.local_path(spark, warehouse) is not None
    if writer == "direct" and not local:
        raise ConfigError(f"table_writer direct needs a warehouse on a mounted filesystem, found {warehouse}; "
                          "use auto or spark")
    return local


#: Column kinds Delta keeps min/max statistics for here (what its data skipping can use on these tables).
_STATS_KINDS = (pa.types.is_string, pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp)


def _stat_value(value, upper: bool):
    """A statistic as Delta's JSON holds it: timestamps in UTC milliseconds, a maximum rounded up.

    Delta keeps timestamp statistics to the millisecond; a maximum truncated
    to it could lie below the true one and make a reader skip a file that
    holds the row it wants (found: a delta-rs reader filtering on
    ``ingested_at`` skipped every file whose statistics lacked the column).
    """
    if not isinstance(value, datetime):
        return value
    value = value.astimezone(UTC)
    extra = value.microsecond % 1000
    value -= timedelta(microseconds=extra)
    if upper and extra:
        value += timedelta(milliseconds=1)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class FileWriter:
    """Data files of one table, written by one task: one row group per :meth:`write`, fsynced on close.

    Files are named like Spark's (``part-<uuid>-c000.<codec>.parquet``) and stay invisible until the
    driver commits them (:func:`commit`).  Statistics (row count, and min, max and null count of the
    string, numeric and timestamp columns) are gathered while writing, so the commit needs no second read.
    """

    def __init__(self, folder: str, schema: pa.Schema, codec: str, max_file_bytes: int = MAX_FILE_BYTES):
        self.folder, self.schema, self.codec, self.max_file_bytes = folder, schema, codec, max_file_bytes
        self.written: list[WrittenFile] = []
        self._writer = self._sink = self._name = None
        self._bytes = self._rows = 0
        self._stats: dict[str, list] = {}

    @property
    def current_name(self) -> str | None:
        """The file the next row group goes to (None until the first write)."""
        return self._name

    def write(self, rows: pa.Table) -> str:
        """Write ``rows`` as one row group; returns the name of the file that holds them."""
        if self._writer is None:
            self._open()
        self._writer.write_table(rows)
        self._bytes += rows.nbytes
        self._rows += rows.num_rows
        self._gather(rows)
        name = self._name
        if self._bytes >= self.max_file_bytes:
            self._finish()
        return name

    def close(self) -> list[WrittenFile]:
        """Finish the open file; every file written, in order."""
        if self._writer is not None:
            self._finish()
        return self.written

    def _open(self) -> None:
        self._name = f"part-{uuid.uuid4()}-c000.{self.codec}.parquet"
        self._sink = open(os.path.join(self.folder, self._name), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=self.codec)

    def _gather(self, rows: pa.Table) -> None:
        for field in self.schema:
            if not any(kind(field.type) for kind in _STATS_KINDS):
                continue
            column = rows.column(field.name)
            low, high = (v.as_py() for v in pc.min_max(column).values())
            stats = self._stats.setdefault(field.name, {"min": None, "max": None, "nulls": 0, "ranged": True})
            stats["nulls"] += column.null_count
            if isinstance(low, float) and not (math.isfinite(low) and math.isfinite(high)):
                stats["ranged"] = False  # NaN or infinity: no range for this file (JSON cannot hold them)
            elif low is not None:
                stats["min"] = low if stats["min"] is None else min(stats["min"], low)
                stats["max"] = high if stats["max"] is None else max(stats["max"], high)

    def _finish(self) -> None:
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        _fsync_folder(self.folder)
        size = os.path.getsize(os.path.join(self.folder, self._name))
        self.written.append(WrittenFile(self._name, size, self._rows, self._stats_json()))
        self._writer = self._sink = self._name = None
        self._bytes = self._rows = 0
        self._stats = {}

    def _stats_json(self) -> str:
        ranged = {n: s for n, s in self._stats.items() if s["ranged"] and s["min"] is not None}
        return json.dumps({"numRecords": self._rows,
                           "minValues": {n: _stat_value(s["min"], False) for n, s in ranged.items()},
                           "maxValues": {n: _stat_value(s["max"], True) for n, s in ranged.items()},
                           "nullCount": {n: s["nulls"] for n, s in self._stats.items()}})


def _fsync_folder(folder: str) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def ensure_table(spark: SparkSession, warehouse: str, table: str, schema: T.StructType | None = None) -> int:
    """Create ``table`` (declared ``schema`` or the table's) or add the declared columns it lacks; its version."""
    tables.create_if_missing(spark, warehouse, table, schema)
    tables.add_missing_columns(spark, warehouse, table)
    return tables.version(spark, warehouse, table)


def commit(spark: SparkSession, warehouse: str, table: str, files: list[WrittenFile], read_version: int,
           operation: dict, removed: tuple[str, ...] = ()) -> int:
    """Add ``files`` to ``table`` (and remove the data files named in ``removed``) in one Delta commit, at
    ``read_version`` + 1 or not at all; the new version.

    ``operation`` goes into the commit's metadata (``ctlake.*`` keys: run id, stage), so Delta's history
    says which run wrote what.  Raises :class:`ConcurrentCommit` when another writer committed after
    ``read_version``: the caller's checks (duplicates, already-processed keys) are stale.
    """
    from deltalake import CommitProperties, DeltaTable
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, RemoveAction

    if not files and not removed:
        return read_version
    delta = DeltaTable(tables.local_folder(spark, warehouse, table), version=read_version)
    now_ms = int(time.time() * 1000)
    adds = [AddAction(f.name, f.size, {}, now_ms, True, f.stats) for f in files]
    adds += [RemoveAction(name, True, now_ms) for name in removed]
    properties = CommitProperties(max_commit_retries=0,
                                  custom_metadata=tables.commit_metadata(operation))
    try:
        delta.create_write_transaction(adds, "append", delta.schema(), commit_properties=properties)
    except CommitFailedError as exc:
        raise ConcurrentCommit(f"{table}: another writer committed after version {read_version}") from exc
    return read_version + 1


def key_strings(rows: pa.Table, keys: list[str]) -> pa.Array:
    """One string per row naming its key (the key columns joined by NUL): set membership for composite keys."""
    parts = [pc.cast(rows.column(k), pa.string()) for k in keys]
    return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x00")


def rewrite_without(spark: SparkSession, warehouse: str, table: str, name: str, keys: list[str],
                    values: set[str], codec: str) -> WrittenFile | None:
    """Data file ``name`` written again without its rows whose key (:func:`key_strings`) is in ``values``.

    The new file (None if no row remains) is not committed; ``name`` is left for the caller to
    discard (a file of this run) or to remove in the commit (a committed file other readers may
    still read).  The rare path (a duplicate file, keys another writer committed first, a committed
    file that mixes replaced and kept rows): the file is read back, filtered and written on the driver.
    """
    folder = tables.local_folder(spark, warehouse, table)
    rows = pq.read_table(os.path.join(folder, name), schema=tables.arrow_schema(table))
    kept = rows.filter(pc.invert(pc.is_in(key_strings(rows, keys), value_set=pa.array(sorted(values), pa.string()))))
    if kept.num_rows == 0:
        return None
    writer = FileWriter(folder, tables.arrow_schema(table), codec)
    writer.write(kept)
    (rewritten,) = writer.close()
    return rewritten


def without_keys(spark: SparkSession, warehouse: str, table: str, written: list[WrittenFile], key_columns: list[str],
                 keys: set[str]) -> list[WrittenFile]:
    """This run's uncommitted files without the rows of ``keys`` (:func:`key_strings`): files holding any are
    written again, the others kept as they are.  For a commit lost to a writer that added some of the keys."""
    folder = tables.local_folder(spark, warehouse, table)
    kept = []
    for file in written:
        held = set(key_strings(pq.read_table(os.path.join(folder, file.name), columns=key_columns), key_columns)
                   .to_pylist())
        if not held & keys:
            kept.append(file)
            continue
        rewritten = rewrite_without(spark, warehouse, table, file.name, key_columns, keys, PIXEL_CODEC)
        discard(spark, warehouse, table, [file])
        kept += [rewritten] if rewritten is not None else []
    return kept


#: A task of a stage whose workers read their input themselves: a row group of a data file, the keys wanted.
TASK_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("row_group", T.IntegerType()),
    T.StructField("keys", T.ArrayType(T.StringType())),
])


def row_group_tasks(spark: SparkSession, located: pa.Table, folder: str, key_columns: list[str]) -> DataFrame:
    """The rows of :func:`ctlake.spark.tables.locate` to process, as :data:`TASK_SCHEMA` tasks, one per row group.

    Twice the cores in partitions: a slow task can be balanced out, and each
    task writes one file, not one per row group.
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for data_file, row_group, key in zip(located.column("data_file").to_pylist(),
                                         located.column("row_group").to_pylist(),
                                         key_strings(located, key_columns).to_pylist()):
        groups.setdefault((os.path.join(folder, data_file), row_group), []).append(key)
    tasks = [(path, group, keys) for (path, group), keys in sorted(groups.items())]
    return spark.createDataFrame(spark.sparkContext.parallelize(
        tasks, max(1, min(len(tasks), 2 * spark.sparkContext.defaultParallelism))), TASK_SCHEMA)


def task_rows(task: dict, columns: list[str], key_columns: list[str]) -> pa.Table:
    """``columns`` of the rows a :data:`TASK_SCHEMA` task wants, read from its one row group."""
    rows = pq.ParquetFile(task["path"]).read_row_group(task["row_group"], columns=columns)
    return rows.filter(pc.is_in(key_strings(rows, key_columns), value_set=pa.array(task["keys"], pa.string())))


def current_keys(existing: pa.Table, key_columns: list[str], column: str, value: str) -> pa.Array:
    """Key strings of the located rows made under ``column == value`` (a chain's or a layout's hash)."""
    current = existing.filter(pc.equal(existing.column(column), value))
    return key_strings(current, key_columns).combine_chunks() if current.num_rows else pa.array([], pa.string())


def commit_replacing(spark: SparkSession, warehouse: str, table: str, written: list[WrittenFile], keys: set[str],
                     key_columns: list[str], current: tuple[str, str], version: int, existing: pa.Table,
                     operation: dict) -> int:
    """Commit this run's uncommitted ``written`` files, which hold the rows of ``keys``; rows committed.

    The upsert of a derived table without a MERGE: committed rows of the same
    keys (made under another hash) are replaced, by removing the files that
    hold them (a file that also holds rows kept is written again without
    the replaced ones).  ``existing`` is :func:`ctlake.spark.tables.locate`
    of the table at ``version`` with the key columns and ``current``'s
    column.  When another writer committed first, the keys it made under
    ``current`` stay its rows: they are dropped from this run's files and the
    commit is made again at the newer version.  On any failure this run's
    files are deleted.
    """
    columns = [c for c in existing.column_names if c not in ("data_file", "row_group")]
    try:
        for _ in range(COMMIT_ATTEMPTS):
            taken = keys & set(current_keys(existing, key_columns, *current).to_pylist())
            if taken:
                written = without_keys(spark, warehouse, table, written, key_columns, taken)
                keys = keys - taken
            added, removed = _replacing(spark, warehouse, table, existing, key_columns, keys)
            try:
                commit(spark, warehouse, table, written + added, version, operation, tuple(removed))
                return len(keys)
            except ConcurrentCommit:
                discard(spark, warehouse, table, added)
                version = tables.version(spark, warehouse, table)
                existing = tables.locate(spark, warehouse, table, columns, version)
        raise ConcurrentWriteError(f"{table}: {COMMIT_ATTEMPTS} commits lost to concurrent writers; run again")
    except BaseException:
        discard(spark, warehouse, table, written)
        raise


def _replacing(spark: SparkSession, warehouse: str, table: str, existing: pa.Table, key_columns: list[str],
               keys: set[str]) -> tuple[list[WrittenFile], list[str]]:
    """Committed files holding rows that ``keys`` replace: their kept rows written again, and their names."""
    by_file: dict[str, list[bool]] = {}
    for data_file, key in zip(existing.column("data_file").to_pylist(), key_strings(existing, key_columns).to_pylist()):
        by_file.setdefault(data_file, []).append(key in keys)
    removed = [name for name, replaced in by_file.items() if any(replaced)]
    # A file that keeps some rows is written again with them (never empty, so never None).
    added = [rewrite_without(spark, warehouse, table, name, key_columns, keys, PIXEL_CODEC)
             for name in removed if not all(by_file[name])]
    return added, removed


def discard(spark: SparkSession, warehouse: str, table: str, files: list[WrittenFile]) -> None:
    """Delete data files that will never be committed (a failed run cleans up after itself)."""
    folder = tables.local_folder(spark, warehouse, table)
    for written in files:
        try:
            os.remove(os.path.join(folder, written.name))
        except FileNotFoundError:
            pass


#: Commits tried before a writer gives up to writers that keep committing first.
COMMIT_ATTEMPTS = 20


def append_new(spark: SparkSession, warehouse: str, table: str, rows: pa.Table, key: str, operation: dict,
               codec: str = "snappy") -> int:
    """Append the driver's small ``rows`` whose ``key`` the table does not hold yet; rows appended.

    The keyed insert of ``quarantine`` and ``source_map`` without a MERGE
    (which cost 3 s a run): the keys are checked against the version the
    commit is made at, and checked again when another writer commits first.
    """
    from deltalake import DeltaTable

    version_now = ensure_table(spark, warehouse, table)
    folder = tables.local_folder(spark, warehouse, table)
    for _ in range(COMMIT_ATTEMPTS):
        present = (DeltaTable(folder, version=version_now).to_pyarrow_dataset()
                   .to_table(columns=[key], filter=pc.field(key).isin(rows.column(key))).column(key))
        fresh = rows.filter(pc.invert(pc.is_in(rows.column(key), value_set=present.combine_chunks())))
        if fresh.num_rows == 0:
            return 0
        writer = FileWriter(folder, tables.arrow_schema(table), codec)
        writer.write(fresh)
        files = writer.close()
        try:
            commit(spark, warehouse, table, files, version_now, operation)
            return fresh.num_rows
        except ConcurrentCommit:
            discard(spark, warehouse, table, files)
            version_now = tables.version(spark, warehouse, table)
    raise ConcurrentWriteError(f"{table}: {COMMIT_ATTEMPTS} commits lost to concurrent writers; run again")

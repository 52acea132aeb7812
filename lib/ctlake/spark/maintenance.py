"""Storage maintenance: VACUUM every table, reclaiming files no retained version reads.

Why it is needed: a writer that is killed, or loses a commit race, leaves
data files that no commit names (``datafiles``: a file is invisible until the
commit that adds it), and every MERGE or replace leaves the files of the
versions before it.  Readers never see either; only disk space is lost, until
VACUUM deletes the unreferenced files older than the retention.

The retention is a promise in two directions.  Time travel: a table version
of the last ``maintenance.retain_hours`` stays readable, so each run in
``ingest_runs`` that recent can be traced to the exact rows it committed
(its ``versions_written``); the runs table's own rows are never removed, only
the files of its superseded versions.  Writers: an uncommitted file younger
than the retention is kept, because its writer may still commit it; so the
retention must be longer than the longest run, which Delta's own check
(168 hours unless told otherwise) protects by default.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from pyspark.sql import SparkSession

from ctlake.config import Settings
from ctlake.spark import tables
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.maintain")

#: Delta refuses a shorter VACUUM retention unless its check is turned off for the statement.
DELTA_MIN_RETAIN_HOURS = 168


def run(spark: SparkSession, settings: Settings) -> dict:
    """VACUUM each table of the warehouse (and the restricted source map); files deleted per table."""
    hours = settings.maintenance.retain_hours
    if hours < DELTA_MIN_RETAIN_HOURS:
        log.warning("retain_hours %s is below Delta's safety margin of %d h: files of a run still writing "
                    "that are older than that would be deleted", hours, DELTA_MIN_RETAIN_HOURS)
    places = [(settings.warehouse, t) for t in tables.SCHEMAS if t != tables.SOURCE_MAP]
    if settings.privacy.restricted_warehouse:
        places.append((settings.privacy.restricted_warehouse, tables.SOURCE_MAP))
    deleted = {}
    check = {"spark.databricks.delta.retentionDurationCheck.enabled": hours >= DELTA_MIN_RETAIN_HOURS}
    with session_conf(spark, check):
        for warehouse, table in places:
            if tables.exists(spark, warehouse, table):
                deleted[table] = vacuum(spark, warehouse, table, hours)
                log.info("%s: %d unreferenced files deleted", table, deleted[table])
    return {"retain_hours": hours, "time_travel_from": datetime.now(UTC) - timedelta(hours=hours),
            "files_deleted": deleted}


def vacuum(spark: SparkSession, warehouse: str, table: str, hours: int) -> int:
    """Delete the table's files that no version of the last ``hours`` reads; how many were deleted.

    A mounted warehouse is vacuumed by delta-rs in its ``full`` mode (files no
    log entry names are deleted too, as Spark's VACUUM does): one listing, no
    Spark job.  Spark's VACUUM took minutes a table in local mode here.
    """
    folder = tables.local_folder(spark, warehouse, table)
    if folder is not None:
        from deltalake import DeltaTable

        return len(DeltaTable(folder).vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False,
                                             full=True))
    statement = f"VACUUM delta.`{tables.table_path(warehouse, table)}` RETAIN {hours} HOURS"
    doomed = spark.sql(statement + " DRY RUN").count()
    spark.sql(statement).collect()
    return doomed

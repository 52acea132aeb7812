"""Build the SparkSession every job and test uses, from the ``spark`` settings alone."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

from ctlake.config import SECRET_KEYS, SparkSettings
from ctlake.errors import ConfigError
from ctlake.spark.jars import DELTA_COORDINATE, cached_jars
from ctlake.spark.tables import SCHEME

#: A filesystem URI as Spark writes it into plan strings (file:/..., hdfs://..., s3a://...).
PATH_PATTERN = r"(?i)\b(?:file|hdfs|s3a?|s3n|abfss?|wasbs?|gs|viewfs|dbfs|local):/[^\s,\]\)\}\"']*"

#: Settings every ctlake session gets unless the configuration overrides them.
BASE_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # Batch jobs write logs, not terminals: the progress bar would fill them with \r.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    # Event logs, the UI and logged properties show these entries as *********(redacted): the
    # pseudonymization key handed to executors by spark.executorEnv.* included.
    "spark.redaction.regex": SECRET_KEYS,
    # Paths name patients (receivers sort into <PatientName>/ folders): plan strings in logs, the UI
    # and the event log show every URI as *********(redacted), input files and tables alike.
    "spark.sql.redaction.string.regex": PATH_PATTERN,
    "spark.redaction.string.regex": PATH_PATTERN,
    # Spark runs a Python worker per core already; numpy's OpenBLAS (and OpenMP) would start a thread per
    # core in each, which wait for cores the other workers hold. Measured on features (8508 patches,
    # 2 cores): Python worker CPU 104 s -> 81 s, throughput 0.74 -> 0.93 of 2 x a one-core loop.
    **{f"spark.executorEnv.{name}": "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
}


#: A master on this machine (``make cluster-up``'s): the driver binds to loopback too.
LOOPBACK_MASTER = re.compile(r"^spark://(127\.0\.0\.1|localhost):")


def build_session(settings: SparkSettings, job: str | None = None) -> SparkSession:
    """Create (or reuse) the session the settings describe; ``job`` names it (``ctlake ingest``) in UIs and history.

    In local mode the Delta jars come from the cache ``make setup`` filled, and
    the Python workers run the same interpreter as the driver, so the venv's
    pydicom and OpenCV are what the executors import.
    """
    conf = dict(BASE_CONF)
    if settings.master.startswith("local") or LOOPBACK_MASTER.match(settings.master):
        # The driver's own servers (block manager, RPC) on loopback, like the cluster's on this machine,
        # and named by address: executors otherwise dial "localhost", which a host may resolve to ::1.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        conf["spark.driver.host"] = os.environ["SPARK_LOCAL_IP"]
    # PySpark tells executors which Python to start from the driver's PYSPARK_PYTHON. Default:
    # this interpreter (right for local mode and a cluster on shared disks); a cluster shipping
    # a venv-pack archive sets spark.executor_python to ./environment/bin/python.
    os.environ.setdefault("PYSPARK_PYTHON", settings.executor_python or sys.executable)
    # Python that Spark starts on the driver's machine (the planner and stream reader of a Python data
    # source, as streaming ingest uses) is this interpreter, not the executors' archive-relative path.
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if "spark.jars.packages" not in settings.conf and settings.delta_jars_dir:
        # The driver ships spark.jars to every executor, so the cache serves clusters too.
        jars = cached_jars(settings.delta_jars_dir)
        if jars:
            conf["spark.jars"] = ",".join(jars)
    if settings.event_log_dir:
        conf.update(_event_log_conf(settings.event_log_dir))
    conf.update({k: _as_conf_value(v) for k, v in settings.conf.items()})

    builder = SparkSession.builder.master(settings.master).appName(f"{settings.app_name} {job}" if job else settings.app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    _require_delta(spark, settings)
    return spark


def _event_log_conf(folder: str) -> dict:
    """Event logs into ``folder``: Spark refuses to start when a local log folder is missing, so it is made."""
    if not SCHEME.match(folder):
        os.makedirs(folder, exist_ok=True)
        folder = "file:" + os.path.abspath(folder)
    # Compressed: a job of thousands of tasks writes tens of MB of JSON events.
    return {"spark.eventLog.enabled": "true", "spark.eventLog.dir": folder, "spark.eventLog.compress": "true"}


def _as_conf_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@contextmanager
def session_conf(spark: SparkSession, values: dict[str, object]) -> Iterator[None]:
    """Session SQL settings for the block only: a stage's tuning never leaks into the next stage.

    Jobs that run in one session one after another (``score`` runs preprocess,
    patches and features) each get the settings they asked for, and the
    session is as it was afterwards.
    """
    before = {key: spark.conf.get(key, None) for key in values}
    for key, value in values.items():
        spark.conf.set(key, _as_conf_value(value))
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _require_delta(spark: SparkSession, settings: SparkSettings) -> None:
    """Fail with directions, not a ClassNotFoundException deep in the first write."""
    try:
        spark._jvm.java.lang.Class.forName(
            "io.delta.tables.DeltaTable", True, spark._jvm.Thread.currentThread().getContextClassLoader()
        )
    except Exception as exc:  # py4j raises a generic Py4JJavaError here
        raise ConfigError(
            "Delta Lake is not on Spark's classpath: run `make setup` (it caches the jars in "
            f"{settings.delta_jars_dir}); under spark-submit pass them with --jars (see `make ingest`), "
            f"or on a cluster use --packages {DELTA_COORDINATE}"
        ) from exc

"""Build the SparkSession every job and test uses, from configuration alone."""
from __future__ import annotations

import os
import sys

from ctlake import config as cfg
from ctlake.errors import ConfigError
from ctlake.spark.jars import DELTA_COORDINATE, cached_jars
from pyspark.sql import SparkSession

#: Settings every ctlake session gets unless the configuration overrides them.
BASE_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # Batch jobs write logs, not terminals: the progress bar would fill them with \r.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
}


def build_session(config: dict) -> SparkSession:
    """Create (or reuse) the session described by the ``spark`` section of ``config``.

    In local mode the Delta jars come from the cache ``make setup`` filled, and
    the Python workers run the same interpreter as the driver, so the venv's
    pydicom and OpenCV are what the executors import.
    """
    master = cfg.get(config, "spark.master", str, "local[*]")
    conf = dict(BASE_CONF)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # PySpark tells executors which Python to start from the driver's PYSPARK_PYTHON. Default:
    # this interpreter (right for local mode and a cluster on shared disks); a cluster shipping
    # a venv-pack archive sets spark.executor_python to ./environment/bin/python.
    os.environ.setdefault("PYSPARK_PYTHON", cfg.get(config, "spark.executor_python", str, None) or sys.executable)
    extra = cfg.get(config, "spark.conf", dict, {}) or {}
    if "spark.jars.packages" not in extra:
        # The driver ships spark.jars to every executor, so the cache serves clusters too.
        jars = cached_jars(cfg.get(config, "spark.delta_jars_dir", str, ".cache/delta-jars"))
        if jars:
            conf["spark.jars"] = ",".join(jars)
    conf.update({k: _as_conf_value(v) for k, v in extra.items()})

    builder = SparkSession.builder.master(master).appName(cfg.get(config, "spark.app_name", str, "ctlake"))
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.get(config, "spark.log_level", str, "WARN"))
    _require_delta(spark, config)
    return spark


def _as_conf_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _require_delta(spark: SparkSession, config: dict) -> None:
    """Fail with directions, not a ClassNotFoundException deep in the first write."""
    try:
        spark._jvm.java.lang.Class.forName(
            "io.delta.tables.DeltaTable", True, spark._jvm.Thread.currentThread().getContextClassLoader()
        )
    except Exception as exc:  # py4j raises a generic Py4JJavaError here
        jars_dir = cfg.get(config, "spark.delta_jars_dir", str, ".cache/delta-jars")
        raise ConfigError(
            "Delta Lake is not on Spark's classpath: run `make setup` (it caches the jars in "
            f"{jars_dir}); under spark-submit pass them with --jars (see `make ingest`), "
            f"or on a cluster use --packages {DELTA_COORDINATE}"
        ) from exc

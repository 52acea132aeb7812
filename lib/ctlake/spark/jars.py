"""Resolve Delta Lake's jars from Maven Central once, into a local cache folder.

Jobs never touch the network: ``make setup`` runs this module, which lets
Spark's own Ivy resolver fetch ``io.delta:delta-spark_<spark>_2.13`` with its
dependencies, then keeps only the jars Spark does not already ship (Spark's
own Jackson, Parquet and Hadoop stay authoritative).  Local sessions then get
the cached jars through ``spark.jars``; clusters use ``--packages`` instead.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pyspark

#: The Maven coordinate matching the pinned delta-spark wheel and Spark 4.2.
DELTA_COORDINATE = "io.delta:delta-spark_4.2_2.13:4.4.0"

_VERSION_SUFFIX = re.compile(r"-\d[\w.\-]*\.jar$")


def _artifact(jar_name: str) -> str:
    """``org.group_artifact-1.2.3.jar`` or ``artifact-1.2.3.jar`` -> ``artifact``."""
    return _VERSION_SUFFIX.sub("", jar_name.split("_", 1)[-1] if "_" in jar_name else jar_name)


def spark_shipped_artifacts() -> set[str]:
    """Names (without versions) of the jars bundled in the installed pyspark."""
    jars_dir = Path(pyspark.__file__).parent / "jars"
    return {_artifact(p.name) for p in jars_dir.glob("*.jar")}


def cached_jars(cache_dir: str | Path) -> list[str]:
    """The resolved jar paths, or an empty list when setup has not run."""
    folder = Path(cache_dir)
    return sorted(str(p.resolve()) for p in folder.glob("*.jar")) if folder.is_dir() else []


def resolve(cache_dir: str | Path, coordinate: str = DELTA_COORDINATE) -> list[str]:
    """Fetch ``coordinate`` and its dependencies, keep what Spark lacks, return the paths."""
    from pyspark.sql import SparkSession

    cache_dir = Path(cache_dir)
    if cached_jars(cache_dir):
        return cached_jars(cache_dir)
    with tempfile.TemporaryDirectory() as ivy:
        spark = (
            SparkSession.builder.master("local[1]")
            .appName("ctlake-resolve-jars")
            .config("spark.jars.packages", coordinate)
            .config("spark.jars.ivy", ivy)
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        spark.stop()
        shipped = spark_shipped_artifacts()
        staging = cache_dir.with_name(cache_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for jar in Path(ivy, "jars").glob("*.jar"):
            if _artifact(jar.name) not in shipped:
                shutil.copy2(jar, staging / jar.name)
        # Rename last so an interrupted download never looks like a finished cache.
        shutil.rmtree(cache_dir, ignore_errors=True)
        staging.rename(cache_dir)
    return cached_jars(cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".cache/delta-jars", help="cache folder (default: %(default)s)")
    parser.add_argument("--coordinate", default=DELTA_COORDINATE, help="Maven coordinate (default: %(default)s)")
    args = parser.parse_args(argv)
    jars = resolve(args.dest, args.coordinate)
    if not any("delta-spark" in j for j in jars):
        print(f"error: {args.coordinate} did not resolve into {args.dest}", file=sys.stderr)
        return 1
    print(f"{len(jars)} Delta Lake jars cached in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

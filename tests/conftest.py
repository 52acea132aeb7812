"""One local Spark session (Delta-enabled, UI off, few partitions) for the whole test run."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from ctlake.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
#: The executors' environment `make package` builds (and `make test` before the tests).
ARCHIVE = ROOT / "dist" / "ctlake-env.tar.gz"


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> Path:
    """A real secret for the session: most tests ingest files that are not a synthetic cohort."""
    path = tmp_path_factory.mktemp("secrets") / "pseudonym.key"
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture(scope="session")
def base_config(key_file) -> Settings:
    """conf/local.yaml with test-sized Spark settings and the session's key."""
    return load_settings(ROOT / "conf" / "local.yaml").updated({
        "privacy.key_file": str(key_file),
        "privacy.restricted_warehouse": None,
        "spark.master": "local[2]",
        "spark.delta_jars_dir": str(ROOT / ".cache" / "delta-jars"),
        "spark.event_log_dir": None,
        "spark.conf.spark.sql.shuffle.partitions": 2,
        "spark.conf.spark.default.parallelism": 2,
        "ingest.progress_seconds": 0,
    })


@pytest.fixture(scope="session")
def spark(base_config):
    from ctlake.spark.session import build_session

    os.environ.pop("CTLAKE_PSEUDONYM_KEY", None)
    session = build_session(base_config.spark)
    yield session
    session.stop()


@pytest.fixture
def config(base_config, tmp_path) -> Settings:
    """The base configuration with a fresh warehouse folder for this test."""
    return base_config.updated({"warehouse": str(tmp_path / "warehouse"),
                                "privacy.restricted_warehouse": str(tmp_path / "restricted")})


def tiny_cohort_config(base_config: Settings, root: Path) -> Settings:
    """A four-patient, eight-slice, 96-pixel cohort: real geometry and nodules, seconds to build."""
    return base_config.updated({
        "cohort.patients": 4, "cohort.slices": 8, "cohort.matrix": 96, "cohort.no_nodule_fraction": 0.25,
        "cohort.rle_fraction": 0.25, "cohort.output": str(root / "cohort"), "warehouse": str(root / "warehouse"),
        "privacy.restricted_warehouse": str(root / "restricted"),
        "patches.annotations": str(root / "cohort" / "annotations.csv"),
        "report.folder": str(root / "report"),
    })


@pytest.fixture(scope="session")
def ingested_cohort(spark, base_config, tmp_path_factory) -> Settings:
    """A tiny generated cohort, ingested once per test session (read-only for tests)."""
    from ctlake.spark import cohort, ingest

    config = tiny_cohort_config(base_config, tmp_path_factory.mktemp("tiny"))
    cohort.run(spark, config)
    ingest.run(spark, config, config.cohort.output + "/dicom")
    return config


@pytest.fixture
def cohort_config(ingested_cohort, tmp_path) -> Settings:
    """The tiny cohort's configuration with a private copy of its warehouse to write into."""
    warehouse = tmp_path / "warehouse"
    shutil.copytree(ingested_cohort.warehouse, warehouse)
    return ingested_cohort.updated({"warehouse": str(warehouse), "report.folder": str(tmp_path / "report")})


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """A standalone master and two workers of one core and 2 GB each, registered; stopped by pid afterwards."""
    from ctlake.spark import cluster

    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is missing: `make test` builds it (make package)")
    folder = tmp_path_factory.mktemp("cluster")
    state = cluster.start(folder, workers=2, cores=1, memory="2g")
    try:
        yield state
    finally:
        started = cluster.ClusterState.load(folder).servers  # workers added by a test included
        stopped = {s.pid for s in cluster.stop(folder)}
        assert not any(cluster._running(s) for s in started), "a cluster process outlived the fixture"
        assert stopped <= {s.pid for s in started}


@pytest.fixture(scope="session")
def installed_env(tmp_path_factory) -> Path:
    """The archive unpacked once, away from where it was built: an environment installed on every node."""
    folder = tmp_path_factory.mktemp("installed-env")
    subprocess.run(["tar", "xzf", str(ARCHIVE), "-C", str(folder)], check=True)
    return folder / "bin" / "python"

"""One local Spark session (Delta-enabled, UI off, few partitions) for the whole test run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from ctlake.config import load_config, with_value

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def base_config() -> dict:
    """conf/local.yaml with test-sized Spark settings."""
    config = load_config(ROOT / "conf" / "local.yaml")
    config = with_value(config, "spark.master", "local[2]")
    config = with_value(config, "spark.delta_jars_dir", str(ROOT / ".cache" / "delta-jars"))
    config = with_value(config, "spark.conf.spark.sql.shuffle.partitions", 2)
    config = with_value(config, "spark.conf.spark.default.parallelism", 2)
    config = with_value(config, "ingest.progress_seconds", 0)
    return config


@pytest.fixture(scope="session")
def spark(base_config):
    from ctlake.spark.session import build_session

    os.environ.pop("CTLAKE_PSEUDONYM_KEY", None)
    session = build_session(base_config)
    yield session
    session.stop()


@pytest.fixture
def config(base_config, tmp_path) -> dict:
    """The base configuration with a fresh warehouse folder for this test."""
    return with_value(base_config, "warehouse", str(tmp_path / "warehouse"))


def tiny_cohort_config(base_config: dict, root: Path) -> dict:
    """A four-patient, eight-slice, 96-pixel cohort: real geometry and nodules, seconds to build."""
    config = base_config
    for key, value in (("cohort.patients", 4), ("cohort.slices", 8), ("cohort.matrix", 96),
                       ("cohort.no_nodule_fraction", 0.25), ("cohort.rle_fraction", 0.25),
                       ("cohort.output", str(root / "cohort")), ("warehouse", str(root / "warehouse")),
                       ("patches.candidates", str(root / "cohort" / "candidates.csv")),
                       ("patches.annotations", str(root / "cohort" / "annotations.csv")),
                       ("report.folder", str(root / "report"))):
        config = with_value(config, key, value)
    return config


@pytest.fixture(scope="session")
def ingested_cohort(spark, base_config, tmp_path_factory) -> dict:
    """A tiny generated cohort, ingested once per test session (read-only for tests)."""
    from ctlake.spark import ingest
    from ctlake.spark.cohort import run as make_cohort

    config = tiny_cohort_config(base_config, tmp_path_factory.mktemp("tiny"))
    make_cohort(spark, config, config["cohort"]["output"])
    ingest.run(spark, config, config["cohort"]["output"] + "/dicom")
    return config


@pytest.fixture
def cohort_config(ingested_cohort, tmp_path) -> dict:
    """The tiny cohort's configuration with a private copy of its warehouse to write into."""
    import shutil

    warehouse = tmp_path / "warehouse"
    shutil.copytree(ingested_cohort["warehouse"], warehouse)
    config = with_value(ingested_cohort, "warehouse", str(warehouse))
    return with_value(config, "report.folder", str(tmp_path / "report"))

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
    from ctlake.session import build_session

    os.environ.pop("CTLAKE_PSEUDONYM_KEY", None)
    session = build_session(base_config)
    yield session
    session.stop()


@pytest.fixture
def config(base_config, tmp_path) -> dict:
    """The base configuration with a fresh warehouse folder for this test."""
    return with_value(base_config, "warehouse", str(tmp_path / "warehouse"))

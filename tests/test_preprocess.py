"""The preprocessing job on real Spark: identical to the pure chain, incremental, reconfigurable."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from ctlake.core.dicom_parse import hu_frame
from ctlake.errors import ConfigError
from ctlake.spark import datafiles, preprocess, tables


def test_udf_output_equals_the_pure_chain_pixel_for_pixel(spark, cohort_config):
    summary = preprocess.run(spark, cohort_config)
    assert summary["slices_processed"] == summary["slices_total"] == 32
    assert summary["errors"] == 0
    chain = cohort_config.preprocess.chain()
    processed = {(r["sop_uid"], r["frame"]): r
                 for r in tables.read(spark, cohort_config.warehouse, tables.PREPROCESSED).collect()}
    for row in tables.read(spark, cohort_config.warehouse, tables.SLICES).collect():
        expected = chain.apply(hu_frame(row["pixels"], row["pixel_shape"]))
        got = processed[(row["sop_uid"], row["frame"])]
        assert got["image"] == expected["image"].tobytes()
        assert got["mask"] == expected["mask"].tobytes()
        assert got["threshold"] == expected["threshold"].tobytes()
        assert got["chain_hash"] == chain.config_hash()
    assert summary["valid_lung_masks"] > 0
    assert Path(summary["montage"]).is_file()


def test_rerun_does_nothing_and_a_changed_chain_reprocesses(spark, cohort_config):
    preprocess.run(spark, cohort_config)
    assert preprocess.run(spark, cohort_config)["slices_processed"] == 0
    steps = cohort_config.preprocess.steps
    changed = cohort_config.updated({"preprocess.steps": [dict(s, ksize=3) if s["step"] == "denoise" else s
                                                          for s in steps]})
    summary = preprocess.run(spark, changed)
    assert summary["slices_processed"] == 32
    table = tables.read(spark, changed.warehouse, tables.PREPROCESSED)
    assert table.count() == 32
    assert {r["chain_hash"] for r in table.select("chain_hash").collect()} == {summary["chain_hash"]}


def test_quality_figures_are_plausible_for_chest_slices(spark, cohort_config):
    preprocess.run(spark, cohort_config)
    rows = tables.read(spark, cohort_config.warehouse, tables.PREPROCESSED).collect()
    fractions = np.array([r["lung_fraction"] for r in rows])
    assert np.all((fractions > 0.02) & (fractions < 0.6))
    assert all(-1000 <= r["lung_mean_hu"] <= -500 for r in rows)


def test_unknown_step_is_a_configuration_error_before_spark(base_config):
    with pytest.raises(ConfigError, match=r"preprocess.steps\[1\]"):
        base_config.updated({"preprocess.steps": [{"step": "window", "preset": "lung"}, {"step": "sharpen"}]})
    result = subprocess.run([sys.executable, "jobs/preprocess.py", "--set", "preprocess.steps=[{step: blur}]"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("preprocess: error: preprocess.steps[0]")
    assert len(result.stderr.strip().splitlines()) == 1


def _table(spark, config) -> list[tuple]:
    """``preprocessed`` as sorted tuples, without the processing time (which differs run to run)."""
    frame = tables.read(spark, config.warehouse, tables.PREPROCESSED).drop("processed_at")
    return sorted(tuple(r) for r in frame.collect())


def test_the_direct_writer_and_spark_make_the_same_table(spark, cohort_config, tmp_path):
    with_spark = cohort_config.updated({"table_writer": "spark", "warehouse": str(tmp_path / "spark-warehouse")})
    shutil.copytree(cohort_config.warehouse, with_spark.warehouse)
    direct = preprocess.run(spark, cohort_config.updated({"table_writer": "direct"}))
    merged = preprocess.run(spark, with_spark)
    assert {k: v for k, v in direct.items() if k != "montage"} == {k: v for k, v in merged.items() if k != "montage"}
    assert _table(spark, cohort_config) == _table(spark, with_spark)


def test_a_new_chain_replaces_rows_in_files_it_shares_with_rows_it_keeps(spark, cohort_config):
    """A row with no slice (kept) and 32 rows of an old chain (replaced) in one committed file."""
    from pyspark.sql import functions as F

    warehouse = cohort_config.warehouse
    old = cohort_config.updated({"preprocess.steps": [dict(s, ksize=3) if s["step"] == "denoise" else s
                                                      for s in cohort_config.preprocess.steps]})
    preprocess.run(spark, old)
    table = tables.read(spark, warehouse, tables.PREPROCESSED)
    orphan = table.limit(1).withColumn("sop_uid", F.lit("1.2.3.orphan"))
    tables.replace(spark, warehouse, tables.PREPROCESSED, table.unionByName(orphan).coalesce(1).localCheckpoint())
    assert len(tables.read(spark, warehouse, tables.PREPROCESSED).inputFiles()) == 1

    summary = preprocess.run(spark, cohort_config)
    assert summary["slices_processed"] == summary["table_rows"] == 32
    rows = tables.read(spark, warehouse, tables.PREPROCESSED).select("sop_uid", "chain_hash").collect()
    assert sorted(r["chain_hash"] for r in rows) == sorted([summary["chain_hash"]] * 32 + [old.preprocess.chain()
                                                                                           .config_hash()])
    assert [r["chain_hash"] for r in rows if r["sop_uid"] == "1.2.3.orphan"] == [old.preprocess.chain().config_hash()]


def test_a_run_that_loses_the_commit_race_leaves_the_rivals_rows(spark, cohort_config, monkeypatch):
    """Another preprocess run of the same chain commits between this run's check and its commit."""
    commit = datafiles.commit
    rival = []

    def commit_after_a_rival(spark_, warehouse, table, files, version, operation, removed=()):
        if table == tables.PREPROCESSED and not rival:
            rival.append(None)
            rival[0] = preprocess.run(spark, cohort_config)
        return commit(spark_, warehouse, table, files, version, operation, removed)

    monkeypatch.setattr(datafiles, "commit", commit_after_a_rival)
    late = preprocess.run(spark, cohort_config)
    assert rival[0]["slices_processed"] == 32 and late["slices_processed"] == 0
    keys = tables.read(spark, cohort_config.warehouse, tables.PREPROCESSED).select("sop_uid", "frame").collect()
    assert len(keys) == len(set(keys)) == 32
    folder = Path(cohort_config.warehouse) / tables.PREPROCESSED
    referenced = {Path(p).name for p in tables.read(spark, cohort_config.warehouse, tables.PREPROCESSED).inputFiles()}
    unreferenced = [p for p in folder.glob("*.parquet") if p.name not in referenced]
    assert all(pq.read_metadata(p).num_rows == 0 for p in unreferenced)  # the loser left no rows behind

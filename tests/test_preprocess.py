"""The preprocessing job on real Spark: identical to the pure chain, incremental, reconfigurable."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from ctlake.core.dicom_parse import hu_frame
from ctlake.errors import ConfigError
from ctlake.spark import preprocess, tables


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

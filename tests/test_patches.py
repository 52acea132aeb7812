"""Patch extraction on real Spark: geometry, lineage, negatives, windows, idempotency."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from ctlake.core.dicom_parse import hu_frame
from ctlake.core.patch_geometry import SliceGeometry, extract_patch_stack, resample_planes, world_to_voxel
from ctlake.core.patch_tasks import PAD_HU, jittered_nodules, plane_offsets_mm
from ctlake.errors import ConfigError
from ctlake.spark import datafiles, detect, patches, preprocess, tables


@pytest.fixture
def preprocessed(spark, cohort_config):
    preprocess.run(spark, cohort_config)
    detect.run(spark, cohort_config)
    return cohort_config


def patch_sources(spark, config) -> list[dict]:
    """What detected mode cuts at: every detected candidate, then every annotated nodule."""
    found = [{"seriesuid": r["series_uid"], "coordX": r["coord_x"], "coordY": r["coord_y"], "coordZ": r["coord_z"],
              "mode": "detected", "label": None}
             for r in tables.read(spark, config.warehouse, tables.CANDIDATES).collect()]
    with open(config.patches.annotations) as handle:
        nodules = [{**n, "mode": "nodule", "label": 1} for n in csv.DictReader(handle)]
    return found + nodules


def slices_by_series(spark, config):
    rows = (tables.read(spark, config.warehouse, tables.SLICES).orderBy("series_uid", "z_position", "sop_uid", "frame")
            .collect())
    series = {}
    for row in rows:
        series.setdefault(row["series_uid"], []).append(row)
    return series


@pytest.mark.parametrize("depth_mm", [0, 32])
def test_detected_and_nodule_patches_match_the_pure_cut_with_full_lineage(spark, preprocessed, depth_mm):
    config = preprocessed.updated({"patches.depth_mm": depth_mm, "patches.jitter.copies": 0})
    summary = patches.run(spark, config)
    params = config.patches.params()
    series = slices_by_series(spark, config)
    candidates = patch_sources(spark, config)
    table = tables.read(spark, config.warehouse, tables.PATCHES).filter(F.col("params_hash") == summary["params_hash"])
    cand_rows = table.filter(F.col("mode").isin("detected", "nodule")).collect()
    n_detected, n_nodules = (sum(c["mode"] == m for c in candidates) for m in ("detected", "nodule"))
    assert n_detected > 0 and n_nodules > 0
    assert summary["detected_located"] == n_detected and summary["detected_off_slab"] == 0
    assert len(cand_rows) == len(candidates) - summary.get("nodule_off_slab", 0)
    by_id = {r["candidate_id"]: r for r in cand_rows}
    assert len(by_id) == len(cand_rows)
    checked = 0
    for cand in candidates:
        stack_rows = series[cand["seriesuid"]]
        geometries = [SliceGeometry(tuple(r["image_position"]), tuple(r["image_orientation"]),
                                    r["pixel_spacing_row"], r["pixel_spacing_col"]) for r in stack_rows]
        index, row, col = world_to_voxel((float(cand["coordX"]), float(cand["coordY"]), float(cand["coordZ"])),
                                         geometries)
        match = [r for r in cand_rows if r["series_uid"] == cand["seriesuid"] and r["slice_index"] == index
                 and abs(r["center_row"] - row) < 1e-6 and abs(r["center_col"] - col) < 1e-6
                 and r["mode"] == cand["mode"]]
        if not match:
            continue
        (got,) = match
        assert got["label"] == cand["label"]
        assert got["sop_uid"] == stack_rows[index]["sop_uid"]
        assert got["patient_pseudonym"] == stack_rows[index]["patient_pseudonym"]
        spacing = (stack_rows[index]["pixel_spacing_row"], stack_rows[index]["pixel_spacing_col"])
        if depth_mm:
            # The whole series, cut and resampled to the patch's planes: the job's stack must cover them.
            images = [hu_frame(r["pixels"], r["pixel_shape"]) for r in stack_rows]
            native = extract_patch_stack(images, (row, col), params.size_mm, params.out_px, spacing, PAD_HU)
            expected = np.rint(resample_planes(native, [r["z_position"] for r in stack_rows],
                                               stack_rows[index]["z_position"] + plane_offsets_mm(params), PAD_HU))
            assert got["channel_spacing_mm"] == params.size_mm / params.out_px
        else:
            images = [hu_frame(stack_rows[i]["pixels"], stack_rows[i]["pixel_shape"])
                      if 0 <= i < len(stack_rows) else None
                      for i in range(index - params.neighbours, index + params.neighbours + 1)]
            expected = extract_patch_stack(images, (row, col), params.size_mm, params.out_px, spacing, PAD_HU)
            assert got["channel_spacing_mm"] is None
        assert got["patch_shape"] == list(expected.shape)
        assert np.frombuffer(got["pixels"], "<i2").reshape(got["patch_shape"]).tolist() == \
            expected.astype(np.int16).tolist()
        checked += 1
    assert checked == len(cand_rows)
    assert Path(summary["patch_grid"]).is_file()
    if depth_mm:
        assert got["patch_shape"] == [33, 32, 32]


def test_each_annotated_nodule_is_also_cut_at_its_displaced_copies(spark, preprocessed):
    summary = patches.run(spark, preprocessed)
    table = tables.read(spark, preprocessed.warehouse, tables.PATCHES).filter(F.col("params_hash") == summary["params_hash"])
    centres = {r["candidate_id"]: r for r in table.filter(F.col("mode") == "nodule").collect()}
    copies = table.filter(F.col("mode") == "jittered").collect()
    nodules = tables.read_annotations(spark, preprocessed.patches.annotations).toPandas().rename(
        columns={"nodule_key": "candidate_id"})
    expected = jittered_nodules(nodules, preprocessed.patches.jitter.copies, preprocessed.patches.jitter.fraction)
    on_slab = [(r["candidate_id"], round(r["coordX"], 9)) for r in expected.to_dict("records")
               if r["candidate_id"] in centres]
    assert centres and sorted((r["candidate_id"], round(r["coord_x"], 9)) for r in copies) == sorted(on_slab)
    assert all(r["label"] == 1 and r["series_uid"] == centres[r["candidate_id"]]["series_uid"] for r in copies)
    assert summary["patches_by_mode_label"]["jittered/1"] == len(copies)


def test_a_series_to_score_gets_its_detected_patches_only(spark, preprocessed):
    uid = tables.read(spark, preprocessed.warehouse, tables.CANDIDATES).select("series_uid").first()["series_uid"]
    patches.run(spark, preprocessed, "detected", [uid])
    rows = tables.read(spark, preprocessed.warehouse, tables.PATCHES).select("series_uid", "mode").collect()
    expected = tables.read(spark, preprocessed.warehouse, tables.CANDIDATES).filter(F.col("series_uid") == uid).count()
    assert sorted(set(rows)) == [(uid, "detected")] and len(rows) == expected


def test_rerun_adds_nothing(spark, preprocessed):
    first = patches.run(spark, preprocessed)
    second = patches.run(spark, preprocessed)
    assert second["patches_total"] == first["patches_total"]
    assert second["patches_by_mode_label"] == first["patches_by_mode_label"]


def test_window_mode_covers_only_the_lung(spark, preprocessed):
    config = preprocessed.updated({"patches.window.stride_mm": 24})
    uid = tables.read(spark, config.warehouse, tables.SLICES).select("series_uid").first()["series_uid"]
    summary = patches.run(spark, config, mode="window", series=[uid])
    rows = tables.read(spark, config.warehouse, tables.PATCHES).filter(F.col("mode") == "window").collect()
    assert rows and summary["patches_total"] == len(rows)
    assert {r["series_uid"] for r in rows} == {uid}
    assert all(r["label"] is None and r["candidate_id"] is None for r in rows)


def test_bad_patch_settings_are_configuration_errors(base_config):
    with pytest.raises(ConfigError, match="patches.neighbours"):
        base_config.updated({"patches.neighbours": 9})
    with pytest.raises(ConfigError, match="patches.size_mm"):
        base_config.updated({"patches.size_mm": -4})
    with pytest.raises(ConfigError, match="patches.depth_mm"):
        base_config.updated({"patches.depth_mm": -1})


def _patches_table(spark, config) -> list[tuple]:
    """``patches`` as sorted tuples, without the creation time (which differs run to run)."""
    return sorted(tuple(r) for r in tables.read(spark, config.warehouse, tables.PATCHES).drop("created_at").collect())


def test_the_direct_writer_and_spark_cut_the_same_patches(spark, preprocessed, tmp_path):
    with_spark = preprocessed.updated({"table_writer": "spark", "warehouse": str(tmp_path / "spark-warehouse")})
    shutil.copytree(preprocessed.warehouse, with_spark.warehouse)
    uid = tables.read(spark, preprocessed.warehouse, tables.SLICES).select("series_uid").first()["series_uid"]
    for config in (preprocessed.updated({"table_writer": "direct"}), with_spark):
        patches.run(spark, config, "detected")
        patches.run(spark, config.updated({"patches.window.stride_mm": 24}), "window", [uid])
    direct = _patches_table(spark, preprocessed)
    assert {r[0] for r in direct} and direct == _patches_table(spark, with_spark)


def test_a_patches_run_that_loses_the_commit_race_adds_each_patch_once(spark, preprocessed, monkeypatch):
    commit = datafiles.commit
    rival = []

    def commit_after_a_rival(spark_, warehouse, table, files, version, operation, removed=()):
        if table == tables.PATCHES and not rival:
            rival.append(None)
            rival[0] = patches.run(spark, preprocessed)  # the rival: a whole run, committed first
        return commit(spark_, warehouse, table, files, version, operation, removed)

    monkeypatch.setattr(datafiles, "commit", commit_after_a_rival)
    late = patches.run(spark, preprocessed)
    ids = [r[0] for r in tables.read(spark, preprocessed.warehouse, tables.PATCHES).select("patch_id").collect()]
    assert len(ids) == len(set(ids)) == rival[0]["patches_total"] == late["patches_total"] > 0

"""The nodule candidate detector and the LUNA16 FROC that measures it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctlake.core.detect import DetectorParams, detect_candidates, detector_hash, world_position
from ctlake.core.froc import froc, match_candidates
from ctlake.core.patch_geometry import SliceGeometry
from ctlake.errors import ConfigError, InputError

SPACING = (2.0, 1.0, 1.0)


def lung_volume(shape=(24, 80, 80)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aerated lung (-850 HU) filling a box, with its mask and mm coordinates of every voxel."""
    volume = np.full(shape, -850.0, dtype=np.float32)
    mask = np.ones(shape, dtype=bool)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING)], indexing="ij")
    return volume, mask, np.stack(grids, axis=-1)


def add_ball(volume, mm, centre_mm, radius_mm, hu):
    volume[np.linalg.norm(mm - np.asarray(centre_mm), axis=-1) <= radius_mm] = hu


def test_a_solid_and_a_ground_glass_ball_are_found_where_they_are_and_a_vessel_is_not_round():
    volume, mask, mm = lung_volume()
    add_ball(volume, mm, (20.0, 25.0, 25.0), 5.0, 40.0)          # solid, 10 mm
    add_ball(volume, mm, (24.0, 55.0, 55.0), 4.0, -560.0)        # ground glass, 8 mm
    distance = np.linalg.norm(mm[..., 1:] - np.array([60.0, 20.0]), axis=-1)
    volume[distance <= 2.0] = 40.0                                 # a vessel along z through every plane
    found = detect_candidates(volume, mask, SPACING, DetectorParams(max_per_series=5, max_faint_per_series=5))
    centres = np.array([[c["plane"] * 2.0, c["row"], c["col"]] for c in found])

    solid = int(np.argmin(np.linalg.norm(centres - (20.0, 25.0, 25.0), axis=1)))
    assert np.linalg.norm(centres[solid] - (20.0, 25.0, 25.0)) <= 1.0
    assert found[solid]["radius_mm"] in (4.5, 6.5)
    assert solid == 0                                               # the strongest candidate
    glass = int(np.argmin(np.linalg.norm(centres - (24.0, 55.0, 55.0), axis=1)))
    assert np.linalg.norm(centres[glass] - (24.0, 55.0, 55.0)) <= 1.0
    assert found[glass]["peak_hu"] < -500                           # found in the faint band
    on_vessel = [c for c, xyz in zip(found, centres) if np.hypot(xyz[1] - 60.0, xyz[2] - 20.0) <= 3.0]
    assert all(c["roundness"] < 0.3 for c in on_vessel)
    assert found[solid]["roundness"] > 0.7


def test_nothing_is_found_outside_the_lungs_or_in_an_empty_mask():
    volume, mask, mm = lung_volume()
    add_ball(volume, mm, (20.0, 25.0, 25.0), 5.0, 40.0)
    mask[:, :, :45] = False                                        # the ball lies 15 mm outside the lung
    found = detect_candidates(volume, mask, SPACING, DetectorParams(lung_margin_mm=3.0))
    assert all(c["col"] >= 45 - 3 for c in found)
    assert detect_candidates(volume, np.zeros_like(mask), SPACING) == []


def test_the_quotas_bound_the_candidates_per_band():
    volume, mask, mm = lung_volume((24, 120, 120))
    rng = np.random.default_rng(3)
    for k in range(12):
        add_ball(volume, mm, (24.0, 15 + 30 * (k % 4), 15 + 30 * (k // 4)), 3.0, 40.0 if k % 2 else -600.0)
    params = DetectorParams(max_per_series=2, max_faint_per_series=3)
    found = detect_candidates(volume + rng.normal(0, 5, volume.shape).astype(np.float32), mask, SPACING, params)
    faint = [c for c in found if c["peak_hu"] < params.faint_hu]
    assert (len(found) - len(faint), len(faint)) == (2, 3)
    assert [c["score"] for c in found] == sorted((c["score"] for c in found), reverse=True)


def test_bad_input_and_bad_parameters_are_named():
    volume, mask, _ = lung_volume((4, 8, 8))
    with pytest.raises(InputError, match="lung mask shape"):
        detect_candidates(volume, mask[:2], SPACING)
    with pytest.raises(InputError, match="spacing_mm"):
        detect_candidates(volume, mask, (0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="detect.radii_mm"):
        DetectorParams(radii_mm=())
    with pytest.raises(ConfigError, match="detect.min_roundness"):
        DetectorParams(min_roundness=2.0)
    assert detector_hash(DetectorParams()) != detector_hash(DetectorParams(max_per_series=41))


def test_world_position_interpolates_between_planes():
    geometries = [SliceGeometry((-100.0, -50.0, z), (1, 0, 0, 0, 1, 0), 0.5, 0.7) for z in (10.0, 12.5, 15.0)]
    np.testing.assert_allclose(world_position(geometries, 1.4, 4.0, 10.0), (-93.0, -48.0, 13.5))
    np.testing.assert_allclose(world_position(geometries, 2.0, 0.0, 0.0), (-100.0, -50.0, 15.0))


# ---------------------------------------------------------------- FROC

NODULES = pd.DataFrame({"series_uid": ["a", "a", "b", "b"], "coordX": [0.0, 50.0, 0.0, 30.0],
                        "coordY": [0.0] * 4, "coordZ": [0.0] * 4, "diameter_mm": [10.0, 6.0, 8.0, 2.0]})


def candidates(rows):
    return pd.DataFrame(rows, columns=["series_uid", "coord_x", "coord_y", "coord_z", "score"])


def test_a_hit_lies_within_the_nodule_radius_of_its_centre():
    found = candidates([("a", 4.9, 0, 0, 1), ("a", 0, 5.1, 0, 1), ("a", 52, 0, 0, 1), ("b", 30, 0.5, 0, 1),
                        ("c", 0, 0, 0, 1)])
    np.testing.assert_array_equal(match_candidates(found, NODULES), [0, -1, 1, 3, -1])


def test_froc_counts_the_best_hit_once_and_ignores_hits_on_small_nodules():
    # Two scans; 3 nodules of 3 mm or more (the 2 mm one in b is excluded).
    found = candidates([
        ("a", 0, 0, 0, 0.9),    # hit nodule 0
        ("a", 1, 0, 0, 0.8),    # second hit on nodule 0: neither TP nor FP
        ("a", 90, 0, 0, 0.7),   # FP
        ("b", 30, 0, 0, 0.6),   # hit on the excluded 2 mm nodule: ignored
        ("b", 0, 1, 0, 0.5),    # hit nodule 2
        ("b", 90, 0, 0, 0.4),   # FP
        ("a", 50, 1, 0, 0.3),   # hit nodule 1
    ])
    result = froc(found, NODULES, n_scans=2)
    assert result["nodules"] == 3
    # FP/scan 0 up to score 0.7: sensitivity 1/3; after it (0.5 FP/scan) 2/3 at 0.5; 1 FP/scan then 3/3.
    assert result["sensitivity"] == {0.125: 1 / 3, 0.25: 1 / 3, 0.5: 2 / 3, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert result["cpm"] == pytest.approx((1 / 3 * 2 + 2 / 3 + 4) / 7)
    assert result["max_sensitivity"] == 1.0


def test_froc_of_a_group_counts_only_its_nodules():
    found = candidates([("a", 0, 0, 0, 0.9), ("a", 90, 0, 0, 0.8), ("b", 0, 0, 0, 0.1)])
    small = froc(found, NODULES, n_scans=2, include=(NODULES["diameter_mm"] < 7).to_numpy())
    assert small["nodules"] == 1 and small["max_sensitivity"] == 0.0
    large = froc(found, NODULES, n_scans=2, include=(NODULES["diameter_mm"] >= 7).to_numpy())
    assert large["nodules"] == 2
    assert large["sensitivity"][0.125] == 0.5 and large["sensitivity"][0.5] == 1.0


# ---------------------------------------------------------------- the job, on real Spark and Delta

def test_the_job_writes_what_the_pure_detector_finds_with_lineage_once(spark, cohort_config):
    from pyspark.sql import functions as F

    from ctlake.core.detect import detect_series
    from ctlake.spark import detect, preprocess, tables
    from ctlake.spark.patches import slice_metadata

    preprocess.run(spark, cohort_config)
    summary = detect.run(spark, cohort_config)
    warehouse, params = cohort_config.warehouse, cohort_config.detect.params()
    statuses = tables.read(spark, warehouse, tables.DETECTIONS).toPandas()
    n_series = tables.read(spark, warehouse, tables.SERIES).count()
    assert summary["series_detected"] == len(statuses) == n_series
    assert statuses["error"].isna().all()

    # The same series through the pure function on the driver: the same candidates.
    masks = tables.read(spark, warehouse, tables.PREPROCESSED).select(
        "sop_uid", "frame", F.when(F.col("mask_valid"), F.col("mask")).alias("mask"))
    rows = (slice_metadata(spark, warehouse).join(tables.read(spark, warehouse, tables.SLICES)
                                                  .select("sop_uid", "frame", "pixels", "pixel_shape"),
                                                  ["sop_uid", "frame"]).join(masks, ["sop_uid", "frame"], "left"))
    expected = []
    for uid in sorted(statuses["series_uid"]):
        group = [r.asDict() for r in rows.filter(F.col("series_uid") == uid).collect()]
        expected += [(uid, c["rank"], c["sop_uid"], c["slice_index"], round(c["coord_x"], 6), round(c["coord_z"], 6),
                      round(c["score"], 6)) for c in detect_series(group, params)]
    table = tables.read(spark, warehouse, tables.CANDIDATES).toPandas()
    got = sorted((r.series_uid, r.rank, r.sop_uid, r.slice_index, round(r.coord_x, 6), round(r.coord_z, 6),
                  round(r.score, 6)) for r in table.itertuples())
    assert got == sorted(expected)
    assert len(expected) == summary["candidates_found"] > 0
    assert table["candidate_id"].is_unique

    again = detect.run(spark, cohort_config)
    assert again["series_detected"] == 0
    assert tables.read(spark, warehouse, tables.CANDIDATES).count() == len(table)


def test_a_series_that_is_not_one_stack_is_named():
    from ctlake.core.detect import series_volume

    rows = [{"slice_index": k, "pixels": bytes(2 * n * n), "pixel_shape": [n, n], "mask": None, "z_position": k,
             "image_position": [0, 0, k], "image_orientation": [1, 0, 0, 0, 1, 0], "pixel_spacing_row": 1.0,
             "pixel_spacing_col": 1.0} for k, n in enumerate((8, 8, 6))]
    with pytest.raises(InputError, match="not one stack"):
        series_volume(rows)

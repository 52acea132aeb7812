"""Patch tasks outside Spark: candidates located on slices, the parameter hash and geometry."""
import numpy as np
import pandas as pd
import pytest

from ctlake.core.patch_tasks import PatchParams, jittered_nodules, locate_candidates, params_hash, patch_geometry


def series(z_positions, spacing=0.5):
    """Axial slices at z (mm), origin (-10, -20), identity orientation, square pixels."""
    return pd.DataFrame({
        "slice_index": list(range(len(z_positions))), "z_position": z_positions,
        "image_position": [[-10.0, -20.0, z] for z in z_positions],
        "image_orientation": [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * len(z_positions),
        "pixel_spacing_row": [spacing] * len(z_positions), "pixel_spacing_col": [spacing] * len(z_positions)})


def candidates(*xyz):
    return pd.DataFrame({"series_uid": ["s"] * len(xyz), "coordX": [p[0] for p in xyz],
                         "coordY": [p[1] for p in xyz], "coordZ": [p[2] for p in xyz],
                         "radius_mm": [None] * len(xyz), "mode": ["candidate"] * len(xyz),
                         "label": [1] * len(xyz), "candidate_id": [f"c{i}" for i in range(len(xyz))]})


def test_candidates_land_on_the_nearest_slice_at_their_pixel():
    located = locate_candidates(candidates((-5.0, -10.0, 2.4), (0.0, 0.0, 7.0)), series([0.0, 2.5, 5.0]))
    first, second = located
    # x = -10 + col * 0.5, y = -20 + row * 0.5
    assert (first["slice_index"], first["row"], first["col"]) == (1, 20.0, 10.0)
    assert first["distance_mm"] == pytest.approx(0.1) and first["z_mm"] == pytest.approx(2.4)
    assert (second["slice_index"], second["distance_mm"]) == (2, pytest.approx(2.0))
    assert (first["candidate_id"], first["coord_x"], first["mode"]) == ("c0", -5.0, "candidate")


def test_slices_in_storage_order_and_no_input_give_the_same_answer():
    shuffled = series([0.0, 2.5, 5.0]).iloc[[2, 0, 1]]
    assert locate_candidates(candidates((-5.0, -10.0, 2.4)), shuffled)[0]["slice_index"] == 1
    assert locate_candidates(candidates(), series([0.0])) == []
    assert locate_candidates(candidates((0.0, 0.0, 0.0)), series([]).iloc[:0]) == []


def test_the_parameter_hash_keys_existing_tables():
    """A changed hash re-cuts every patch of every warehouse: it must follow the parameters only."""
    assert params_hash(PatchParams(size_mm=32.0, out_px=32, neighbours=1, depth_mm=32.0, jitter_copies=2,
                                   jitter_fraction=0.05)) == "2cb42bc7ea7f"
    assert params_hash(PatchParams(size_mm=32.0, out_px=32, neighbours=1, depth_mm=0.0)) != "2cb42bc7ea7f"
    assert patch_geometry(PatchParams(window_stride_mm=8.0)) == patch_geometry(PatchParams())
    assert patch_geometry(PatchParams(jitter_copies=2)) == patch_geometry(PatchParams())


def test_jittered_copies_are_displaced_by_the_fraction_of_the_diameter_and_repeat():
    nodules = pd.DataFrame({"candidate_id": ["a", "b"], "coordX": [1.0, -4.0], "coordY": [2.0, 0.0],
                            "coordZ": [3.0, 9.0], "diameter_mm": [10.0, 20.0], "series_uid": ["s", "t"]})
    copies = jittered_nodules(nodules, 2000, 0.05)
    assert list(copies.columns) == list(nodules.columns) and len(copies) == 4000
    for nodule in nodules.itertuples():
        mine = copies[copies["candidate_id"] == nodule.candidate_id]
        offsets = mine[["coordX", "coordY", "coordZ"]].to_numpy() - [nodule.coordX, nodule.coordY, nodule.coordZ]
        assert np.abs(offsets.mean(axis=0)).max() < 0.1 * nodule.diameter_mm * 0.05
        assert offsets.std(axis=0) == pytest.approx([0.05 * nodule.diameter_mm] * 3, rel=0.06)
        assert (mine[["series_uid", "diameter_mm"]] == [nodule.series_uid, nodule.diameter_mm]).all().all()
    pd.testing.assert_frame_equal(jittered_nodules(nodules, 2000, 0.05), copies)
    assert jittered_nodules(nodules, 0, 0.05).empty
